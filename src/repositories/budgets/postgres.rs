//! Budgets' spend for PostgreSQL's large batches: the spend kept in memory
//! between them, as SQLite keeps it, so that a batch writes no budget row
//! for a key whose events leave the row as it is.
//!
//! A large batch locks `key_budgets` (`EXCLUSIVE`, after `events`, in the
//! order setting a budget or a price locks them) before anything else, and
//! reads the stamp [`SpendMemory`] is trusted by: the next event id, and
//! the counts of `key_changes` (which every write of a budget moves) and
//! `spend_folds` (which a prune folding rollups moves). Every recording
//! statement names `key_budgets`, so while the batch holds the lock no
//! other store records, and one that recorded before moved the next event
//! id; the statement of a recording that waited for the lock takes its
//! snapshot after it (`spend_cte`).
//!
//! The spend is then kept as on SQLite: `spend_nanos`, and the cost in the
//! key's rollups from `rollup_hour` on, which the batch's statement writes
//! anyway. The keys of the batch that the memory does not hold are read
//! first, in one statement; the statement that records the batch returns
//! each event's cost; each key's events are added in memory ([`walk`]),
//! and only the rows that change (a new period, a spend moved out of the
//! rollups into `spend_nanos`, a limit reached) are written, in one
//! statement, with the limits reached queued in one more.

use std::collections::HashMap;

use diesel::connection::SimpleConnection;
use diesel::sql_types::{Array, BigInt, Nullable};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use super::memory::{walk, KnownSpend, SpendMemory, Spends, FOLD_HOURS};
use super::BudgetRow;
use crate::error::Result;
use crate::model::budget::FUTURE_SPEND_ALLOWANCE_MS;
use crate::model::event::EventId;
use crate::model::price::Cost;
use crate::model::time::Timestamp;

/// What a large batch read as it began.
#[derive(QueryableByName)]
struct Stamp {
    /// The next event id.
    #[diesel(sql_type = BigInt)]
    events: i64,
    /// The counts of `key_changes` and `spend_folds`, added.
    #[diesel(sql_type = BigInt)]
    changes: i64,
    /// The server's clock (the transaction's start), in Unix milliseconds.
    #[diesel(sql_type = BigInt)]
    now: i64,
}

const STAMP: &str = "SELECT \
      (SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM event_ids) \
        AS events, \
      (SELECT CAST(sum(next) AS BIGINT) FROM sequences \
        WHERE name IN ('key_changes', 'spend_folds')) AS changes, \
      CAST(extract(epoch FROM now()) * 1000 AS BIGINT) AS now";

/// A budget row and its whole spend, as a batch reads them.
#[derive(QueryableByName)]
struct Loaded {
    #[diesel(embed)]
    stored: BudgetRow,
    #[diesel(sql_type = BigInt)]
    spend: i64,
}

/// The cost in a key's rollups from an hour on.
#[derive(QueryableByName)]
struct Rolled {
    #[diesel(sql_type = BigInt)]
    key_row_id: i64,
    #[diesel(sql_type = BigInt)]
    rolled: i64,
}

/// A large batch's hold on the spend memory, from its lock to its end.
pub(crate) struct Batch<'m> {
    memory: std::sync::MutexGuard<'m, Spends>,
    changes: i64,
    now: Timestamp,
}

/// Locks the tables a large batch writes the spend by, reads the stamp,
/// and reads the budget rows of the batch's keys (`keys`, row ids) that the
/// memory does not hold. Inside the batch's transaction, before its
/// statement.
pub(crate) fn begin<'m>(
    conn: &mut PgConnection,
    memory: &'m SpendMemory,
    keys: impl Iterator<Item = i64>,
) -> Result<Batch<'m>> {
    conn.batch_execute(
        "LOCK TABLE events IN ROW EXCLUSIVE MODE; LOCK TABLE key_budgets IN EXCLUSIVE MODE",
    )?;
    let stamp: Stamp = diesel::sql_query(STAMP).get_result(conn)?;
    let mut memory = memory.begin((stamp.events, stamp.changes));
    let keys: Vec<i64> = keys.collect();
    let mut missing: Vec<i64> = keys
        .iter()
        .copied()
        .filter(|k| !memory.keys.contains_key(k))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !memory.has_room_for(missing.len()) {
        // Started again empty before the keys are read, never between:
        // every key of the batch is read.
        memory.keys.clear();
        missing = keys;
        missing.sort_unstable();
        missing.dedup();
    }
    if !missing.is_empty() {
        let loaded: Vec<Loaded> = diesel::sql_query(
            "SELECT b.key_row_id, b.budget_nanos, b.soft_nanos, b.period_days, b.anchor, \
               b.period_start, b.spend_nanos, b.rollup_hour, \
               CASE WHEN b.rollup_hour IS NULL THEN b.spend_nanos \
                 ELSE keytally_kept_spend(b.key_row_id, b.spend_nanos, b.rollup_hour) END \
                 AS spend \
             FROM key_budgets AS b WHERE b.key_row_id = ANY($1)",
        )
        .bind::<Array<BigInt>, _>(&missing)
        .load(conn)?;
        for key in missing {
            memory.remember(key, None);
        }
        for row in loaded {
            memory.remember(
                row.stored.key_row_id,
                Some(KnownSpend {
                    stored: row.stored,
                    spend: row.spend,
                }),
            );
        }
    }
    Ok(Batch {
        memory,
        changes: stamp.changes,
        now: Timestamp::from_stored(stamp.now),
    })
}

/// What a key's events change in its budget row.
struct Change {
    known: KnownSpend,
    /// The spend before the batch.
    before: i64,
    /// The cost of the key's events in the batch, all of them.
    batch_cost: Vec<(i64, i64)>,
}

impl Batch<'_> {
    /// Adds the recorded batch to its keys' spend: `spends` are its events
    /// of keys with a cost (key row id, time, cost), sorted by key, time
    /// and position; `last_id` is the batch's last event id. Writes the
    /// budget rows that change and queues the limits reached.
    pub(crate) fn add(
        mut self,
        conn: &mut PgConnection,
        spends: &[(i64, Timestamp, Cost)],
        last_id: EventId,
    ) -> Result<()> {
        let horizon = self.now.plus_millis(FUTURE_SPEND_ALLOWANCE_MS);
        let mut events = Vec::new();
        let mut changes: Vec<(i64, Change, i64, i64)> = Vec::new();
        let mut reports: Vec<[i64; 4]> = Vec::new();
        let mut soft: Vec<Option<i64>> = Vec::new();
        for (position, &(key_row_id, ts, cost)) in spends.iter().enumerate() {
            events.push((ts, cost));
            if spends.get(position + 1).map(|next| next.0) == Some(key_row_id) {
                continue;
            }
            if let Some(Some(known)) = self.memory.keys.get_mut(&key_row_id) {
                if !known.add_within(&events, horizon) {
                    let row = known.stored;
                    let (start, spend, reached) = walk(&row, known.spend, &events, horizon);
                    for step in reached {
                        reports.push([key_row_id, step.period, step.after, row.budget_nanos]);
                        soft.push(row.soft_nanos);
                    }
                    // Hours that may be folded: before the last event's
                    // and the clock's.
                    let fold_to = events
                        .last()
                        .map_or(i64::MAX, |(ts, _)| ts.hour())
                        .min(self.now.hour() - 1);
                    let start_hour = Timestamp::from_stored(start).hour();
                    let hour = match row.rollup_hour {
                        Some(from)
                            if start == row.period_start
                                && fold_to.saturating_sub(from) < FOLD_HOURS =>
                        {
                            from
                        }
                        _ => start_hour.max(fold_to),
                    };
                    let change = Change {
                        known: *known,
                        before: known.spend,
                        batch_cost: events
                            .iter()
                            .map(|(ts, c)| (ts.hour(), c.nanos()))
                            .collect(),
                    };
                    changes.push((key_row_id, change, start, spend));
                    // The row as it is written, below.
                    known.stored.period_start = start;
                    known.stored.rollup_hour = Some(hour);
                    known.spend = spend;
                }
            }
            events.clear();
        }
        self.write(conn, changes)?;
        if !reports.is_empty() {
            let column = |i: usize| reports.iter().map(|r| r[i]).collect::<Vec<i64>>();
            diesel::sql_query(
                "INSERT INTO budget_reports \
                   (key_row_id, period_start, spend_nanos, budget_nanos, soft_nanos) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], \
                   $5::bigint[])",
            )
            .bind::<Array<BigInt>, _>(column(0))
            .bind::<Array<BigInt>, _>(column(1))
            .bind::<Array<BigInt>, _>(column(2))
            .bind::<Array<BigInt>, _>(column(3))
            .bind::<Array<Nullable<BigInt>>, _>(&soft)
            .execute(conn)?;
            // A report of the budget refused its key and moved
            // `key_changes`.
            let stamp: Stamp = diesel::sql_query(STAMP).get_result(conn)?;
            self.changes = stamp.changes;
        }
        self.memory.pending = Some((last_id.0.saturating_add(1), self.changes));
        Ok(())
    }

    /// Writes the budget rows of `changes` (key row id, change, the
    /// period's start and spend after the batch) whose stored values
    /// change. A row keeping its `rollup_hour` has the rollups' part of its
    /// spend known from before the batch; for a new one it is read.
    fn write(
        &mut self,
        conn: &mut PgConnection,
        changes: Vec<(i64, Change, i64, i64)>,
    ) -> Result<()> {
        let moved: Vec<(i64, i64)> = changes
            .iter()
            .filter_map(|(key, change, _, _)| {
                let hour = self
                    .memory
                    .keys
                    .get(key)
                    .copied()
                    .flatten()?
                    .stored
                    .rollup_hour?;
                (Some(hour) != change.known.stored.rollup_hour).then_some((*key, hour))
            })
            .collect();
        let mut rolled: HashMap<i64, i64> = HashMap::new();
        if !moved.is_empty() {
            let (keys, hours): (Vec<i64>, Vec<i64>) = moved.iter().copied().unzip();
            let rows: Vec<Rolled> = diesel::sql_query(format!(
                "SELECT t.k AS key_row_id, \
                   CAST(LEAST(coalesce(sum(u.cost_nanos), 0), {max}) AS BIGINT) AS rolled \
                 FROM unnest($1::bigint[], $2::bigint[]) AS t(k, h) \
                 LEFT JOIN usage_key_hourly AS u ON u.key_row_id = t.k AND u.hour >= t.h \
                 GROUP BY t.k",
                max = i64::MAX
            ))
            .bind::<Array<BigInt>, _>(&keys)
            .bind::<Array<BigInt>, _>(&hours)
            .load(conn)?;
            rolled.extend(rows.into_iter().map(|row| (row.key_row_id, row.rolled)));
        }
        let mut written: [Vec<i64>; 4] = Default::default();
        for (key, change, start, spend) in changes {
            let Some(Some(known)) = self.memory.keys.get_mut(&key) else {
                continue;
            };
            let hour = known.stored.rollup_hour.unwrap_or(0);
            let row = change.known.stored;
            let rolled_after = match rolled.get(&key) {
                Some(&rolled) => rolled,
                // The rollups' part before the batch, and the batch's
                // events from that hour on (all of them are in the
                // rollups, counted or not).
                None => change
                    .before
                    .saturating_sub(row.spend_nanos)
                    .saturating_add(
                        change
                            .batch_cost
                            .iter()
                            .filter(|(h, _)| *h >= hour)
                            .fold(0_i64, |sum, (_, cost)| sum.saturating_add(*cost)),
                    ),
            };
            let spend_nanos = spend.saturating_sub(rolled_after);
            known.stored.spend_nanos = spend_nanos;
            if (start, spend_nanos, Some(hour))
                != (row.period_start, row.spend_nanos, row.rollup_hour)
            {
                for (column, value) in written.iter_mut().zip([key, spend_nanos, start, hour]) {
                    column.push(value);
                }
            }
        }
        if !written[0].is_empty() {
            diesel::sql_query(
                "UPDATE key_budgets AS b SET spend_nanos = t.spend, period_start = t.start, \
                   rollup_hour = t.hour \
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                   AS t(k, spend, start, hour) \
                 WHERE b.key_row_id = t.k",
            )
            .bind::<Array<BigInt>, _>(&written[0])
            .bind::<Array<BigInt>, _>(&written[1])
            .bind::<Array<BigInt>, _>(&written[2])
            .bind::<Array<BigInt>, _>(&written[3])
            .execute(conn)?;
        }
        Ok(())
    }
}
