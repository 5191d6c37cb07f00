//! The daily partitions of `events` on PostgreSQL: made ahead of the clock
//! and dropped whole by retention, under an advisory lock so that the
//! replicas of a gateway do not race each other.
//!
//! Partition `events_dYYYYMMDD` holds the events of that UTC day;
//! `events_default` holds the rest (older logs ingested later, a clock far
//! ahead). Making a day's partition moves that day's rows out of the
//! default partition in the same transaction.

use chrono::{DateTime, NaiveDate};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

use crate::error::{Error, Result};
use crate::model::time::{Timestamp, DAY_MS};

/// Days before today that keep a partition of their own when missing.
pub const DAYS_BEHIND: i64 = 1;

/// Days after today made ahead of the clock.
pub const DAYS_AHEAD: i64 = 7;

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
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// A day partition: its day number (days since the Unix epoch).
fn day_of(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("events_d")?;
    let date = NaiveDate::parse_from_str(digits, "%Y%m%d").ok()?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    Some((date - epoch).num_days())
}

/// The partition's name for a day number.
fn name_of(day: i64) -> Result<String> {
    let date = DateTime::from_timestamp_millis(day * DAY_MS)
        .ok_or_else(|| Error::BadStoredValue {
            message: format!("day {day} is out of range"),
        })?
        .date_naive();
    Ok(format!("events_d{}", date.format("%Y%m%d")))
}

/// The day partitions that exist, by day number.
fn days(conn: &mut PgConnection) -> Result<Vec<(i64, String)>> {
    let names: Vec<Name> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = to_regclass('events')",
    )
    .load(conn)?;
    let mut days: Vec<(i64, String)> = names
        .into_iter()
        .filter_map(|row| day_of(&row.name).map(|day| (day, row.name)))
        .collect();
    days.sort();
    Ok(days)
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

/// Makes the partitions of the days from `DAYS_BEHIND` before `now` to
/// `DAYS_AHEAD` after it that are missing. Returns the names made (empty
/// when another replica holds the lock).
pub(crate) fn make_ahead(conn: &mut PgConnection, now: Timestamp) -> Result<Vec<String>> {
    Ok(with_lock(conn, |conn| {
        let today = now.as_millis().div_euclid(DAY_MS);
        let existing: Vec<i64> = days(conn)?.into_iter().map(|(day, _)| day).collect();
        let mut made = Vec::new();
        for day in today - DAYS_BEHIND..=today + DAYS_AHEAD {
            if existing.contains(&day) {
                continue;
            }
            let name = name_of(day)?;
            make(conn, &name, day)?;
            made.push(name);
        }
        Ok(made)
    })?
    .unwrap_or_default())
}

/// Makes one day's partition, moving that day's rows out of the default
/// partition, in one transaction.
fn make(conn: &mut PgConnection, name: &str, day: i64) -> Result<()> {
    let (from, to) = (day * DAY_MS, (day + 1) * DAY_MS);
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

/// Drops the day partitions that end at or before `cutoff`, with their
/// events. Returns how many events they held (0 when another replica holds
/// the lock, which drops them).
pub(crate) fn drop_before(conn: &mut PgConnection, cutoff: Timestamp) -> Result<u64> {
    Ok(with_lock(conn, |conn| {
        let mut dropped = 0u64;
        for (day, name) in days(conn)? {
            if (day + 1) * DAY_MS > cutoff.as_millis() {
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
    fn a_day_and_its_partition_name_go_both_ways() -> Result<()> {
        let day = 1_795_996_800_000 / DAY_MS; // 2026-11-30
        let name = name_of(day)?;
        assert_eq!(name, "events_d20261130");
        assert_eq!(day_of(&name), Some(day));
        assert_eq!(day_of("events_default"), None);
        Ok(())
    }
}
