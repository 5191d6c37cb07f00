//! The monthly partitions of `events` on PostgreSQL: made ahead of the
//! clock and dropped whole by retention, under an advisory lock so that the
//! replicas of a gateway do not race each other.
//!
//! Partition `events_mYYYYMM` holds the events of that UTC calendar month;
//! `events_default` holds the rest (older logs ingested later, a clock far
//! ahead). Making a month's partition moves its rows out of the default
//! partition in the same transaction.
//!
//! Months, not days: PostgreSQL 15 plans a statement on a partitioned table
//! in time that grows with the number of partitions. With 10 partitions
//! (a day each, a week ahead) one key's usage over a day fell from 8,255 to
//! 1,663 queries a second and a single event's record from 2,565 to 1,998
//! a second, against 2 partitions (the small workload of
//! `docs/performance.md`); a 60-day retention in days would keep over 60.

use chrono::{DateTime, Datelike, NaiveDate};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

use crate::error::{Error, Result};
use crate::model::time::Timestamp;

/// Months after the current one made ahead of the clock.
pub const MONTHS_AHEAD: i32 = 1;

/// How long making or dropping a partition waits for its locks (it locks
/// `events` briefly) before it gives up until the next sweep.
const DDL_LOCK_TIMEOUT_MS: u64 = 500;

/// The advisory lock a replica holds while it makes or drops partitions:
/// "kt-parts" in ASCII.
const PARTITION_LOCK: i64 = 0x6b74_2d70_6172_7473;

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// A month as its number since January of year 0 (year * 12 + month - 1).
type Month = i32;

fn month_of_date(date: NaiveDate) -> Month {
    date.year() * 12 + date.month0() as i32
}

/// The month a time falls in.
fn month_of(time: Timestamp) -> Result<Month> {
    Ok(month_of_date(
        DateTime::from_timestamp_millis(time.as_millis())
            .ok_or_else(|| out_of_range(time.as_millis()))?
            .date_naive(),
    ))
}

fn out_of_range(value: impl std::fmt::Display) -> Error {
    Error::BadStoredValue {
        message: format!("{value} is out of the range of a partition"),
    }
}

/// The first millisecond of a month.
fn start_of(month: Month) -> Result<i64> {
    let date = NaiveDate::from_ymd_opt(month.div_euclid(12), month.rem_euclid(12) as u32 + 1, 1)
        .ok_or_else(|| out_of_range(month))?;
    Ok(date
        .and_hms_opt(0, 0, 0)
        .ok_or_else(|| out_of_range(month))?
        .and_utc()
        .timestamp_millis())
}

/// The partition's name for a month.
fn name_of(month: Month) -> String {
    format!(
        "events_m{:04}{:02}",
        month.div_euclid(12),
        month.rem_euclid(12) + 1
    )
}

/// A month partition's month, from its name.
fn month_of_name(name: &str) -> Option<Month> {
    let digits = name.strip_prefix("events_m")?;
    let date = NaiveDate::parse_from_str(&format!("{digits}01"), "%Y%m%d").ok()?;
    Some(month_of_date(date))
}

/// The month partitions that exist, oldest first.
fn months(conn: &mut PgConnection) -> Result<Vec<(Month, String)>> {
    let names: Vec<Name> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = to_regclass('events')",
    )
    .load(conn)?;
    let mut months: Vec<(Month, String)> = names
        .into_iter()
        .filter_map(|row| month_of_name(&row.name).map(|month| (month, row.name)))
        .collect();
    months.sort();
    Ok(months)
}

/// Runs `f` if this process gets the partition lock at once; another
/// replica holding it is doing the same work. Returns `None` then.
fn with_lock<T>(
    conn: &mut PgConnection,
    f: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<Option<T>> {
    let locked: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(PARTITION_LOCK)
        .get_result(conn)?;
    if !locked.locked {
        return Ok(None);
    }
    let outcome = f(conn);
    let unlocked = diesel::sql_query("SELECT pg_advisory_unlock($1) AS locked")
        .bind::<BigInt, _>(PARTITION_LOCK)
        .get_result::<Locked>(conn);
    let outcome = outcome?;
    unlocked?;
    Ok(Some(outcome))
}

/// Makes the partitions of the month of `now` and of the [`MONTHS_AHEAD`]
/// after it that are missing. Returns the names made (empty when another
/// replica holds the lock).
pub(crate) fn make_ahead(conn: &mut PgConnection, now: Timestamp) -> Result<Vec<String>> {
    let current = month_of(now)?;
    Ok(with_lock(conn, |conn| {
        let existing: Vec<Month> = months(conn)?.into_iter().map(|(month, _)| month).collect();
        let mut made = Vec::new();
        for month in current..=current + MONTHS_AHEAD {
            if existing.contains(&month) {
                continue;
            }
            let name = name_of(month);
            make(conn, &name, start_of(month)?, start_of(month + 1)?)?;
            made.push(name);
        }
        Ok(made)
    })?
    .unwrap_or_default())
}

/// Makes one month's partition, moving its rows out of the default
/// partition, in one transaction.
fn make(conn: &mut PgConnection, name: &str, from: i64, to: i64) -> Result<()> {
    conn.transaction(|conn| {
        // The new partition locks the default partition: give up soon
        // rather than hold up the writers queued behind it, and try again
        // at the next sweep.
        conn.batch_execute(&format!(
            "SET LOCAL lock_timeout = {DDL_LOCK_TIMEOUT_MS}; \
             CREATE TEMPORARY TABLE keytally_moving ON COMMIT DROP AS \
               WITH moved AS (DELETE FROM events_default WHERE ts >= {from} AND ts < {to} \
               RETURNING *) SELECT * FROM moved; \
             CREATE TABLE {name} PARTITION OF events FOR VALUES FROM ({from}) TO ({to}); \
             INSERT INTO events SELECT * FROM keytally_moving;"
        ))?;
        tracing::info!(partition = name, "made an events partition");
        Ok(())
    })
}

/// Drops the month partitions that end at or before `cutoff`, with their
/// events. Returns how many events they held (0 when another replica holds
/// the lock, which drops them).
pub(crate) fn drop_before(conn: &mut PgConnection, cutoff: Timestamp) -> Result<u64> {
    Ok(with_lock(conn, |conn| {
        let mut dropped = 0u64;
        for (month, name) in months(conn)? {
            if start_of(month + 1)? > cutoff.as_millis() {
                break;
            }
            let rows = conn.transaction(|conn| -> Result<i64> {
                conn.batch_execute(&format!("SET LOCAL lock_timeout = {DDL_LOCK_TIMEOUT_MS}"))?;
                let count: Count =
                    diesel::sql_query(format!("SELECT count(*) AS value FROM {name}"))
                        .get_result(conn)?;
                conn.batch_execute(&format!("DROP TABLE {name}"))?;
                Ok(count.value)
            })?;
            tracing::info!(
                partition = name,
                events = rows,
                "dropped an events partition"
            );
            dropped += u64::try_from(rows).unwrap_or(0);
        }
        Ok(dropped)
    })?
    .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_and_its_partition_go_both_ways() -> Result<()> {
        // 2026-11-30T00:00:00Z.
        let month = month_of(Timestamp::from_millis(1_795_996_800_000)?)?;
        assert_eq!(name_of(month), "events_m202611");
        assert_eq!(month_of_name("events_m202611"), Some(month));
        assert_eq!(start_of(month)?, 1_793_491_200_000);
        assert_eq!(name_of(month + 1), "events_m202612");
        assert_eq!(name_of(month + 2), "events_m202701");
        assert_eq!(month_of_name("events_default"), None);
        Ok(())
    }
}
