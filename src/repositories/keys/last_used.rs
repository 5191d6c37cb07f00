//! `last_used_at`: noted in memory by every resolve, written in batches.
//!
//! A resolve writes nothing: it notes the key and the time here, and the
//! store's maintenance thread (or [`crate::Keys::flush_last_used`], or the
//! close) writes what was noted in short transactions. A write never moves
//! a time backwards, and what fails to be written is noted again.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::db::database::{Conn, Database};
use crate::db::sql::CachedSql;
#[cfg(feature = "postgres")]
use crate::db::sql::{sql_text, FixedSql, Value};
use crate::error::Result;
use crate::repositories::fast_hash::BuildFastHasher;
use diesel::RunQueryDsl;

/// Keys whose `last_used_at` one flush transaction writes.
const CHUNK: usize = 500;

/// The `last_used_at` times noted and not written yet, by key row id, in
/// Unix milliseconds.
#[derive(Debug, Default)]
pub(crate) struct LastUsed {
    noted: Mutex<HashMap<i64, i64, BuildFastHasher>>,
}

impl LastUsed {
    /// Notes that the key with `row_id` was used at `millis`.
    pub(crate) fn note(&self, row_id: i64, millis: i64) {
        self.noted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(row_id, millis);
    }

    /// Writes every noted time, in transactions of 500 keys, so that
    /// recording never waits long behind them, in the order of the keys'
    /// row ids: the keys of one transaction then sit on a few neighbouring
    /// pages of `keys` (on SQLite, the table is ordered by row id), where in
    /// no order each of its 500 rows would be on a page of its own, every
    /// page written to the log once per transaction that touches it; and
    /// replicas flushing on PostgreSQL lock the rows in one order. Returns
    /// how many keys it updated. On failure the times not written are
    /// noted again.
    pub(crate) fn flush(&self, db: &Database) -> Result<usize> {
        let noted = std::mem::take(&mut *self.noted.lock().unwrap_or_else(PoisonError::into_inner));
        if noted.is_empty() {
            return Ok(0);
        }
        let mut noted: Vec<(i64, i64)> = noted.into_iter().collect();
        noted.sort_unstable();
        for (index, chunk) in noted.chunks(CHUNK).enumerate() {
            if let Err(error) = db.write(|conn| write(conn, chunk)) {
                let mut pending = self.noted.lock().unwrap_or_else(PoisonError::into_inner);
                for &(row_id, millis) in &noted[index * CHUNK..] {
                    let entry = pending.entry(row_id).or_insert(millis);
                    *entry = (*entry).max(millis);
                }
                return Err(error);
            }
        }
        Ok(noted.len())
    }
}

/// Writes noted `last_used_at` times, never moving one backwards.
fn write(conn: &mut Conn<'_>, noted: &[(i64, i64)]) -> Result<()> {
    match conn {
        Conn::Sqlite(c) => {
            for &(row_id, millis) in noted {
                // Diesel does not keep an UPDATE prepared; this runs once per key.
                let update = CachedSql::new(
                    "UPDATE keys SET last_used_at = ? WHERE row_id = ? \
                     AND (last_used_at IS NULL OR last_used_at < ?)",
                    vec![millis, row_id, millis],
                );
                update.execute(*c)?;
            }
        }
        // One round trip for the chunk, where a statement per key was 500.
        #[cfg(feature = "postgres")]
        Conn::Postgres(c) => {
            let (row_ids, times): (Vec<i64>, Vec<i64>) = noted.iter().copied().unzip();
            FixedSql::<WriteLastUsed>::new(vec![
                Value::IntArray(&row_ids),
                Value::IntArray(&times),
            ])
            .execute(*c)?;
        }
    }
    Ok(())
}

#[cfg(feature = "postgres")]
sql_text!(
    /// Writes the `last_used_at` times of a chunk of keys, their row ids and
    /// times given as two arrays, never moving a time backwards. The plan is
    /// a nested loop over `unnest`, so the rows are locked in the arrays'
    /// (row-id) order.
    WriteLastUsed = "UPDATE keys AS k SET last_used_at = u.millis \
        FROM unnest(?, ?) AS u(row_id, millis) \
        WHERE k.row_id = u.row_id AND (k.last_used_at IS NULL OR k.last_used_at < u.millis)"
);
