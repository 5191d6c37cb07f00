//! [`Timestamp`]: a point in time as stored, in Unix milliseconds (UTC).

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use diesel::deserialize::FromSqlRow;
use diesel::expression::AsExpression;
use diesel::sql_types::BigInt;
use serde::{Serialize, Serializer};

use crate::model::invalid::Invalid;

/// Milliseconds in an hour.
pub(crate) const HOUR_MS: i64 = 3_600_000;

/// Milliseconds in a day.
pub(crate) const DAY_MS: i64 = 24 * HOUR_MS;

/// The latest accepted time: the last millisecond of year 9999.
const MAX_MS: i64 = 253_402_300_799_999;

/// A point in time, stored as Unix milliseconds (UTC).
///
/// Serialized (and displayed) as RFC 3339 with milliseconds, such as
/// `2026-11-21T23:00:00.000Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, AsExpression, FromSqlRow)]
#[diesel(sql_type = BigInt)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current time.
    pub fn now() -> Timestamp {
        // Straight from the clock: chrono's `Utc::now` converts to a calendar
        // date and back, which showed in the cost of a key resolution.
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        Timestamp(i64::try_from(millis).unwrap_or(i64::MAX))
    }

    /// A timestamp from Unix milliseconds.
    ///
    /// # Errors
    ///
    /// [`Invalid`] if it is before 1970 or after year 9999.
    pub fn from_millis(millis: i64) -> Result<Timestamp, Invalid> {
        if !(0..=MAX_MS).contains(&millis) {
            return Err(Invalid::new(
                "timestamp",
                format!("{millis} ms is outside 1970-01-01 to 9999-12-31"),
            ));
        }
        Ok(Timestamp(millis))
    }

    /// A timestamp from a chrono time.
    ///
    /// # Errors
    ///
    /// [`Invalid`] if it is before 1970 or after year 9999.
    pub fn from_datetime(time: DateTime<Utc>) -> Result<Timestamp, Invalid> {
        Timestamp::from_millis(time.timestamp_millis())
    }

    /// Parses RFC 3339 (`2026-11-21T23:00:00Z`) or integer Unix milliseconds.
    ///
    /// # Errors
    ///
    /// [`Invalid`] if it is neither, or out of range.
    pub fn parse(text: &str) -> Result<Timestamp, Invalid> {
        let text = text.trim();
        if let Ok(millis) = text.parse::<i64>() {
            return Timestamp::from_millis(millis);
        }
        let time = DateTime::parse_from_rfc3339(text).map_err(|e| {
            Invalid::new(
                "timestamp",
                format!("{text:?} is neither RFC 3339 nor Unix milliseconds: {e}"),
            )
        })?;
        Timestamp::from_datetime(time.with_timezone(&Utc))
    }

    /// A value read back from the database, taken as it is.
    pub(crate) fn from_stored(millis: i64) -> Timestamp {
        Timestamp(millis)
    }

    /// Unix milliseconds.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// As a chrono time.
    pub fn to_datetime(self) -> DateTime<Utc> {
        // Every stored value passed `from_millis`, whose range chrono covers;
        // a value written by something else falls back to the epoch.
        DateTime::from_timestamp_millis(self.0).unwrap_or_default()
    }

    /// The timestamp `millis` later (saturating).
    pub fn plus_millis(self, millis: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(millis).min(MAX_MS))
    }

    /// The whole hour this falls in, as hours since the epoch.
    pub(crate) fn hour(self) -> i64 {
        self.0.div_euclid(HOUR_MS)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &self
                .to_datetime()
                .to_rfc3339_opts(SecondsFormat::Millis, true),
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_and_millis() -> Result<(), Invalid> {
        let a = Timestamp::parse("2026-11-21T23:00:00Z")?;
        let b = Timestamp::parse(&a.as_millis().to_string())?;
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "2026-11-21T23:00:00.000Z");
        Ok(())
    }

    #[test]
    fn refuses_out_of_range_and_garbage() {
        assert!(Timestamp::parse("-1").is_err());
        assert!(Timestamp::parse("99999999999999999").is_err());
        assert!(Timestamp::parse("yesterday").is_err());
        assert!(Timestamp::parse("1969-12-31T23:59:59Z").is_err());
    }
}
