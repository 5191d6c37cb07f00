//! Budgets as values: a limit on what a key may spend in a period
//! ([`Budget`]), the periods ([`BudgetPeriod`]: a day, a calendar month, or
//! a fixed number of days from a start, all in UTC), and a key's standing
//! in its current period ([`BudgetStatus`]).
//!
//! A period is a half-open span of time `[start, end)`. A key is over its
//! budget while the spend of the period it is in has reached the limit;
//! the next period starts from nothing, by time alone.

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, NaiveDate};
use serde::{Serialize, Serializer};

use crate::model::invalid::Invalid;
use crate::model::price::Cost;
use crate::model::time::{Timestamp, DAY_MS};

/// The longest fixed period: 36,500 days.
pub const MAX_PERIOD_DAYS: u32 = 36_500;

/// How far past the store's clock (the database server's, on PostgreSQL)
/// an event's time may be and still count against its key's budget, in
/// milliseconds: clocks a little apart. An event from further ahead counts
/// in usage but not against the budget, so that one wrong time cannot move
/// a key's period forward and leave the current one unchecked.
pub(crate) const FUTURE_SPEND_ALLOWANCE_MS: i64 = 5 * 60 * 1000;

/// How long a budget's spend accumulates before it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    /// A calendar day in UTC, from midnight.
    Day,
    /// A calendar month in UTC, from the first at midnight.
    Month,
    /// `days` days at a time, the first starting at `from`.
    Days {
        /// The length of a period, in days (1 to [`MAX_PERIOD_DAYS`]).
        days: u32,
        /// When the first period starts; spend before it does not count.
        from: Timestamp,
    },
}

impl BudgetPeriod {
    /// The period as stored: `period_days` (NULL for a month) and `anchor`.
    pub(crate) fn stored(self) -> (Option<i32>, i64) {
        match self {
            BudgetPeriod::Day => (Some(1), 0),
            BudgetPeriod::Month => (None, 0),
            BudgetPeriod::Days { days, from } => (
                Some(i32::try_from(days).unwrap_or(i32::MAX)),
                from.as_millis(),
            ),
        }
    }

    /// The period from its stored columns.
    pub(crate) fn from_stored(days: Option<i32>, anchor: i64) -> BudgetPeriod {
        match (days, anchor) {
            (None, _) => BudgetPeriod::Month,
            (Some(1), 0) => BudgetPeriod::Day,
            (Some(days), anchor) => BudgetPeriod::Days {
                days: u32::try_from(days).unwrap_or(1),
                from: Timestamp::from_stored(anchor),
            },
        }
    }

    /// The start of the period `at` falls in; `None` before the first
    /// period of a fixed-days budget.
    pub fn start_of(self, at: Timestamp) -> Option<Timestamp> {
        let at_ms = at.as_millis();
        let start = match self {
            BudgetPeriod::Day => at_ms - at_ms.rem_euclid(DAY_MS),
            BudgetPeriod::Month => {
                let date = at.to_datetime().date_naive();
                month_start(date.year(), date.month())?
            }
            BudgetPeriod::Days { days, from } => {
                let from = from.as_millis();
                if at_ms < from {
                    return None;
                }
                let length = i64::from(days) * DAY_MS;
                from + (at_ms - from) / length * length
            }
        };
        Some(Timestamp::from_stored(start))
    }

    /// The end (exclusive) of the period that starts at `start`.
    pub fn end_after(self, start: Timestamp) -> Timestamp {
        let start_ms = start.as_millis();
        let end = match self {
            BudgetPeriod::Day => start_ms.saturating_add(DAY_MS),
            BudgetPeriod::Month => {
                let date = start.to_datetime().date_naive();
                let (year, month) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                month_start(year, month).unwrap_or(i64::MAX)
            }
            BudgetPeriod::Days { days, .. } => start_ms.saturating_add(i64::from(days) * DAY_MS),
        };
        Timestamp::from_stored(end)
    }

    fn validate(self) -> Result<(), Invalid> {
        match self {
            BudgetPeriod::Days { days, .. } if days == 0 || days > MAX_PERIOD_DAYS => {
                Err(Invalid::new(
                    "budget",
                    format!("a period of {days} days: 1 to {MAX_PERIOD_DAYS}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Unix milliseconds of the first of the month at midnight UTC.
fn month_start(year: i32, month: u32) -> Option<i64> {
    let date = NaiveDate::from_ymd_opt(year, month, 1)?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

impl fmt::Display for BudgetPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BudgetPeriod::Day => f.write_str("day"),
            BudgetPeriod::Month => f.write_str("month"),
            BudgetPeriod::Days { days, from } => write!(f, "{days}d from {from}"),
        }
    }
}

impl Serialize for BudgetPeriod {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A limit on a key's spend per period, with an optional soft limit that
/// is only reported (once per period, when the spend reaches it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// The spend at which the key stops resolving, until the next period.
    pub limit: Cost,
    /// The spend at which it is reported, at most the limit.
    pub soft_limit: Option<Cost>,
    /// How long the spend accumulates.
    pub period: BudgetPeriod,
}

impl Budget {
    /// A budget of `limit` per `period`, without a soft limit.
    pub fn new(limit: Cost, period: BudgetPeriod) -> Budget {
        Budget {
            limit,
            soft_limit: None,
            period,
        }
    }

    /// Checks the limits (above zero, the soft one at most the limit) and
    /// the period's length.
    ///
    /// # Errors
    ///
    /// [`Invalid`] naming what is wrong.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.limit.nanos() <= 0 {
            return Err(Invalid::new("budget", "a budget must be above zero"));
        }
        if let Some(soft) = self.soft_limit {
            if soft.nanos() <= 0 {
                return Err(Invalid::new(
                    "soft_budget",
                    "a soft limit must be above zero",
                ));
            }
            if soft > self.limit {
                return Err(Invalid::new(
                    "soft_budget",
                    format!(
                        "a soft limit of {soft} is above the budget ({})",
                        self.limit
                    ),
                ));
            }
        }
        self.period.validate()
    }

    /// The key's standing at `now`, from what is stored: the spend of the
    /// period that began at `period_start`.
    pub(crate) fn status_at(
        self,
        now: Timestamp,
        period_start: Timestamp,
        spend: Cost,
    ) -> BudgetStatus {
        let current = self.period.start_of(now);
        let start = current.unwrap_or(period_start);
        let spend = if current == Some(period_start) {
            spend
        } else {
            Cost::default()
        };
        BudgetStatus {
            budget: self,
            period_start: start,
            resets_at: self.period.end_after(start),
            spend,
            over_budget: spend >= self.limit,
            soft_limit_reached: self.soft_limit.is_some_and(|soft| spend >= soft),
        }
    }

    /// Until when a key whose period that began at `period_start` has
    /// spent `spend` is refused: the period's end once the spend has
    /// reached the limit.
    pub(crate) fn refused_until(self, period_start: Timestamp, spend: Cost) -> Option<Timestamp> {
        (spend >= self.limit).then(|| self.period.end_after(period_start))
    }
}

/// `AMOUNT/PERIOD`: `25.00/month`, `5/day`, or `100/30d` (30 days at a
/// time from midnight UTC today).
impl FromStr for Budget {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<Budget, Invalid> {
        let refuse = |why: &str| {
            Invalid::new(
                "budget",
                format!("{text:?}: {why} (write AMOUNT/PERIOD: 25.00/month, 5/day or 100/30d)"),
            )
        };
        let (amount, period) = text.split_once('/').ok_or_else(|| refuse("no period"))?;
        let limit: Cost = amount
            .parse()
            .map_err(|invalid: Invalid| Invalid::new("budget", invalid.reason))?;
        let period = match period.trim() {
            "day" => BudgetPeriod::Day,
            "month" => BudgetPeriod::Month,
            other => {
                let days: u32 = other
                    .strip_suffix('d')
                    .and_then(|days| days.parse().ok())
                    .ok_or_else(|| refuse("the period is day, month or a number of days (30d)"))?;
                let from = BudgetPeriod::Day
                    .start_of(Timestamp::now())
                    .unwrap_or_else(Timestamp::now);
                BudgetPeriod::Days { days, from }
            }
        };
        let budget = Budget::new(limit, period);
        budget.validate()?;
        Ok(budget)
    }
}

/// A key's budget and where it stands in the current period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetStatus {
    /// The budget.
    pub budget: Budget,
    /// When the current period started (or starts, for a fixed-days budget
    /// whose first period is still ahead).
    pub period_start: Timestamp,
    /// When it ends and the spend starts again from nothing.
    pub resets_at: Timestamp,
    /// What the key's events of the current period cost.
    pub spend: Cost,
    /// Whether the spend has reached the limit: the key does not resolve.
    pub over_budget: bool,
    /// Whether the spend has reached the soft limit.
    pub soft_limit_reached: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn at(text: &str) -> Result<Timestamp, Invalid> {
        Timestamp::parse(text)
    }

    #[test]
    fn periods_start_and_end_in_utc() -> TestResult {
        let now = at("2026-12-31T23:59:59.999Z")?;
        assert_eq!(
            BudgetPeriod::Day.start_of(now),
            Some(at("2026-12-31T00:00:00Z")?)
        );
        let month = BudgetPeriod::Month.start_of(now).ok_or("no month")?;
        assert_eq!(month, at("2026-12-01T00:00:00Z")?);
        assert_eq!(
            BudgetPeriod::Month.end_after(month),
            at("2027-01-01T00:00:00Z")?
        );
        let feb = BudgetPeriod::Month
            .start_of(at("2028-02-29T12:00:00Z")?)
            .ok_or("no month")?;
        assert_eq!(
            BudgetPeriod::Month.end_after(feb),
            at("2028-03-01T00:00:00Z")?
        );
        let days = BudgetPeriod::Days {
            days: 7,
            from: at("2026-11-02T06:00:00Z")?,
        };
        assert_eq!(days.start_of(at("2026-11-02T05:59:59Z")?), None);
        let start = days
            .start_of(at("2026-11-16T06:00:00Z")?)
            .ok_or("no period")?;
        assert_eq!(start, at("2026-11-16T06:00:00Z")?);
        assert_eq!(days.end_after(start), at("2026-11-23T06:00:00Z")?);
        Ok(())
    }

    #[test]
    fn budgets_parse_from_amount_and_period() -> TestResult {
        let budget: Budget = "25.00/month".parse()?;
        assert_eq!(budget.limit, Cost(25_000_000_000));
        assert_eq!(budget.period, BudgetPeriod::Month);
        assert!(matches!(
            "1.5/30d".parse::<Budget>()?.period,
            BudgetPeriod::Days { days: 30, .. }
        ));
        for bad in [
            "25", "0/day", "-1/day", "5/week", "5/0d", "5/36501d", "x/day",
        ] {
            assert!(bad.parse::<Budget>().is_err(), "{bad} was accepted");
        }
        Ok(())
    }
}
