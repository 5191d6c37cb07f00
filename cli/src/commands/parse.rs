//! Parsing command-line values: durations, times, key ids, model lists.

use std::time::Duration;

use keytally::{AllowedModels, Budget, BudgetPeriod, Cost, Error, KeyId, Timestamp};

/// A duration such as `90s`, `15m`, `24h`, `30d` or `0`.
pub fn duration(text: &str) -> Result<Duration, Error> {
    let invalid = || Error::InvalidInput {
        field: "duration",
        reason: format!("{text:?} is not a duration such as 90s, 15m, 24h or 30d"),
    };
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(invalid)
}

/// The smallest bare number taken as Unix milliseconds: 1973-03-03. A
/// smaller one (`--since 5`) is far more likely a duration without its unit.
const SMALLEST_BARE_MILLIS: i64 = 100_000_000_000;

/// A time: RFC 3339, Unix milliseconds, or a duration ago (`7d`).
pub fn time(text: &str) -> Result<Timestamp, Error> {
    if let Ok(ago) = duration(text) {
        if text.trim() != "0" {
            return Ok(ago_from_now(ago));
        }
    }
    if let Ok(number) = text.trim().parse::<i64>() {
        if number < SMALLEST_BARE_MILLIS {
            return Err(Error::InvalidInput {
                field: "time",
                reason: format!(
                    "{text:?} needs a unit or a date: a duration ago such as 5m, 12h or 7d, \
                     an RFC 3339 time such as 2026-11-20T00:00:00Z, or Unix milliseconds \
                     such as 1790000000000"
                ),
            });
        }
    }
    Timestamp::parse(text).map_err(|_| Error::InvalidInput {
        field: "time",
        reason: format!(
            "{text:?} is not a time: use a duration ago such as 5m, 12h or 7d, an RFC 3339 \
             time such as 2026-11-20T00:00:00Z, or Unix milliseconds such as 1790000000000"
        ),
    })
}

/// `count` and `noun`, in the plural unless it is one (`1 event`, `2 events`).
pub fn counted(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Now minus `ago` (saturating at the epoch).
pub fn ago_from_now(ago: Duration) -> Timestamp {
    let millis = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
    Timestamp::now().plus_millis(-millis.min(Timestamp::now().as_millis()))
}

/// Now plus `later`.
pub fn from_now(later: Duration) -> Timestamp {
    Timestamp::now().plus_millis(i64::try_from(later.as_millis()).unwrap_or(i64::MAX))
}

/// A key id.
pub fn key_id(text: &str) -> Result<KeyId, Error> {
    Ok(text.parse::<KeyId>()?)
}

/// `*` or comma-separated model names.
pub fn models(text: &str) -> Result<AllowedModels, Error> {
    let names: Vec<&str> = text.split(',').map(str::trim).collect();
    Ok(AllowedModels::from_names(&names)?)
}

/// A budget from `--budget AMOUNT/PERIOD`, `--soft-budget AMOUNT` and
/// `--budget-from TIME` (the start of a fixed-days period); `base` is the
/// key's budget for a change of the soft limit or start alone.
pub fn budget(
    budget: Option<&str>,
    soft: Option<&str>,
    from: Option<&str>,
    base: Option<Budget>,
) -> Result<Option<Budget>, Error> {
    let mut result = match (budget, base) {
        (Some(text), _) => text.parse::<Budget>()?,
        (None, Some(base)) => base,
        (None, None) if soft.is_none() && from.is_none() => return Ok(None),
        (None, None) => {
            return Err(Error::InvalidInput {
                field: "budget",
                reason: "the key has no budget: give one with --budget AMOUNT/PERIOD".to_owned(),
            })
        }
    };
    if let Some(soft) = soft {
        result.soft_limit = Some(soft.parse::<Cost>()?);
    }
    if let Some(from) = from {
        let BudgetPeriod::Days { days, .. } = result.period else {
            return Err(Error::InvalidInput {
                field: "budget_from",
                reason: "only a budget of a number of days (such as 100/30d) has a start"
                    .to_owned(),
            });
        };
        result.period = BudgetPeriod::Days {
            days,
            from: time(from)?,
        };
    }
    result.validate()?;
    Ok(Some(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() -> Result<(), Error> {
        assert_eq!(duration("90s")?, Duration::from_secs(90));
        assert_eq!(duration("24h")?, Duration::from_secs(86_400));
        assert_eq!(duration("60d")?, Duration::from_secs(60 * 86_400));
        assert_eq!(duration("0")?, Duration::ZERO);
        for bad in ["", "d", "12", "5y", "-3d", "99999999999999999999d"] {
            assert!(duration(bad).is_err(), "{bad:?} accepted");
        }
        Ok(())
    }
}
