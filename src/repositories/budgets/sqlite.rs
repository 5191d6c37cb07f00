//! Budgets' spend on SQLite: [`add_spends`], called by the recording
//! transaction after the rollups, with what it keeps in memory between
//! transactions ([`SpendMemory`]). See the parent module for how the spend
//! is kept.

use diesel::prelude::*;

use super::memory::{walk, KnownSpend, SpendMemory, FOLD_HOURS};
use super::{rolled_since, BudgetRow};
use crate::db::database::Conn;
use crate::db::schema::{budget_reports, key_budgets, keys, sequences};
use crate::db::sql::{sql_text, FixedSql, Value};
use crate::error::Result;
use crate::model::price::Cost;
use crate::model::time::Timestamp;

/// How many of a key's rollup rows from `rollup_hour` on, of hours before
/// the last one recorded, [`add_spend`] reads before it folds them into
/// `spend_nanos` (a write of the budget row, once per so many rows).
const FOLD_ROWS: i64 = 64;

sql_text!(
    /// A key's (`?1`) budget row with each of its rollup rows from
    /// `rollup_hour` on (their hour and cost; once with NULLs when there is
    /// none), summed by the caller: SQLite's `SUM` fails on an overflow
    /// where recording saturates. No row for a key without a budget. The
    /// key's rollup rows sit together, on the page its event just wrote.
    KeptSpend = "SELECT b.key_row_id, b.budget_nanos, b.soft_nanos, b.period_days, b.anchor, \
           b.period_start, b.spend_nanos, b.rollup_hour, \
           u.hour AS rolled_hour, u.cost_nanos AS rolled_cost \
         FROM key_budgets AS b LEFT JOIN usage_key_hourly AS u \
           ON u.key_row_id = b.key_row_id AND u.hour >= b.rollup_hour \
         WHERE b.key_row_id = ?1"
);

#[derive(QueryableByName)]
struct KeptRow {
    #[diesel(embed)]
    stored: BudgetRow,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    rolled_hour: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    rolled_cost: Option<i64>,
}

/// Adds a batch's events of one key to its spend, inside SQLite's write
/// transaction, after the rollups counted them: `events` are the key's
/// events with a cost, in time order; those after `horizon` (too far ahead
/// of the clock) spend nothing. The events are walked in memory as one
/// spend: an event of a later period starts it again, one of an earlier
/// period (or before the first) leaves it, and an event that makes it reach
/// a limit refuses the key until the period's end and moves `key_changes`
/// (the budget), and queues a report, as PostgreSQL's recording statement and its trigger on `budget_reports` do. The
/// budget row is written only when what it stores changes (the module's
/// notes): nearly always a read of the row and of the key's rollup rows.
fn add_spend(
    conn: &mut diesel::SqliteConnection,
    key_row_id: i64,
    events: &[(Timestamp, Cost)],
    horizon: Timestamp,
) -> Result<Added> {
    let Some(&(last, _)) = events.last() else {
        return Ok(Added::default());
    };
    // Hours that may be folded: before the last event's and the clock's.
    let fold_to = last.hour().min(Timestamp::now().hour() - 1);
    let query = FixedSql::<KeptSpend>::new(vec![Value::Int(key_row_id)]);
    let kept: Vec<KeptRow> = query.load(conn)?;
    let Some(row) = kept.first().map(|kept| kept.stored) else {
        return Ok(Added::default());
    };
    // What the rollups hold of the spend, and how many of their rows are
    // of hours before `fold_to`.
    let (rolled, foldable) = kept.iter().fold((0_i64, 0_i64), |(sum, rows), kept| {
        (
            sum.saturating_add(kept.rolled_cost.unwrap_or(0)),
            rows + i64::from(kept.rolled_hour.is_some_and(|hour| hour < fold_to)),
        )
    });
    // The spend before the batch: the rollups already hold its events.
    let in_rollups = events
        .iter()
        .filter(|(ts, _)| row.rollup_hour.is_some_and(|from| ts.hour() >= from))
        .fold(0_i64, |sum, (_, cost)| sum.saturating_add(cost.nanos()));
    let before = row
        .spend_nanos
        .saturating_add(rolled)
        .saturating_sub(in_rollups);
    let (start, spend, reached) = walk(&row, before, events, horizon);
    for step in reached {
        report_limits(conn, &row, step.period, step.before, step.after)?;
    }
    let rollup_hour = if start != row.period_start || row.rollup_hour.is_none() {
        Timestamp::from_stored(start).hour()
    } else if foldable >= FOLD_ROWS
        || row
            .rollup_hour
            .is_some_and(|from| fold_to.saturating_sub(from) >= FOLD_HOURS)
    {
        fold_to
    } else {
        row.rollup_hour.unwrap_or(fold_to)
    };
    let rolled = if Some(rollup_hour) == row.rollup_hour {
        rolled
    } else {
        rolled_since(&mut Conn::Sqlite(conn), key_row_id, rollup_hour)?
    };
    let spend_nanos = spend.saturating_sub(rolled);
    let stored = BudgetRow {
        period_start: start,
        spend_nanos,
        rollup_hour: Some(rollup_hour),
        ..row
    };
    let wrote = (start, spend_nanos, Some(rollup_hour))
        != (row.period_start, row.spend_nanos, row.rollup_hour);
    if wrote {
        diesel::update(key_budgets::table.filter(key_budgets::key_row_id.eq(key_row_id)))
            .set((
                key_budgets::spend_nanos.eq(spend_nanos),
                key_budgets::period_start.eq(start),
                key_budgets::rollup_hour.eq(rollup_hour),
            ))
            .execute(conn)?;
    }
    Ok(Added {
        known: Some(KnownSpend { stored, spend }),
        wrote,
    })
}

/// What [`add_spend`] left: the key's budget row and spend (`None`: the
/// key has no budget), and whether it wrote the row.
#[derive(Debug, Default)]
struct Added {
    known: Option<KnownSpend>,
    wrote: bool,
}

/// The counters a recording transaction on SQLite read as it began
/// (`events`, `budget_changes`), and the `events` counter it leaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) events: i64,
    pub(crate) budget_changes: i64,
    pub(crate) events_after: i64,
}

/// Adds a recording transaction's events to their keys' spend on SQLite,
/// after the rollups counted them: `spends` are its events of keys with a
/// cost, sorted by key and time (none without budgets: the memory is still
/// told of the transaction). Events after `horizon` (too far ahead of the
/// clock) spend nothing. What it leaves in memory is trusted once the
/// transaction committed.
pub(crate) fn add_spends(
    conn: &mut diesel::SqliteConnection,
    memory: &SpendMemory,
    counters: Counters,
    spends: &[(i64, Timestamp, Cost)],
    horizon: Timestamp,
) -> Result<()> {
    let mut memory = memory.begin((counters.events, counters.budget_changes));
    let mut writes = 0;
    let mut events = Vec::new();
    for (position, &(key_row_id, ts, cost)) in spends.iter().enumerate() {
        events.push((ts, cost));
        if spends.get(position + 1).map(|next| next.0) == Some(key_row_id) {
            continue;
        }
        let in_memory = match memory.keys.get_mut(&key_row_id) {
            Some(None) => true,
            Some(Some(known)) => known.add_within(&events, horizon),
            None => false,
        };
        if !in_memory {
            let added = add_spend(conn, key_row_id, &events, horizon)?;
            writes += i64::from(added.wrote);
            memory.remember(key_row_id, added.known);
        }
        events.clear();
    }
    memory.pending = Some((
        counters.events_after,
        counters.budget_changes.saturating_add(writes),
    ));
    Ok(())
}

/// What an event that took the spend of the period starting at `start`
/// from `before` to `after` reached: the budget refuses the key until the
/// period's end and moves `key_changes`; either limit queues a report.
fn report_limits(
    conn: &mut diesel::SqliteConnection,
    row: &BudgetRow,
    start: i64,
    before: i64,
    after: i64,
) -> Result<()> {
    let reaches = |limit: i64| before < limit && after >= limit;
    let limit = reaches(row.budget_nanos);
    if limit {
        let until = row.budget().period.end_after(Timestamp::from_stored(start));
        diesel::update(keys::table.filter(keys::row_id.eq(row.key_row_id)))
            .set(keys::over_budget_until.eq(until))
            .execute(conn)?;
        diesel::update(sequences::table.filter(sequences::name.eq("key_changes")))
            .set(sequences::next.eq(sequences::next + 1))
            .execute(conn)?;
    }
    if limit || row.soft_nanos.is_some_and(reaches) {
        diesel::insert_into(budget_reports::table)
            .values((
                budget_reports::key_row_id.eq(row.key_row_id),
                budget_reports::period_start.eq(start),
                budget_reports::spend_nanos.eq(after),
                budget_reports::budget_nanos.eq(row.budget_nanos),
                budget_reports::soft_nanos.eq(row.soft_nanos),
            ))
            .execute(conn)?;
    }
    Ok(())
}
