//! The `key_budgets` table: a key's budget and the running spend of its
//! current period, kept as events are recorded so that resolving a key
//! never reads events or rollups.
//!
//! - [`set`] writes or removes a budget inside the caller's key change, its
//!   spend counted once from the key's events already in the period
//!   ([`set_for_new_key`]: a key created in the same transaction has none).
//! - Recording adds each event's cost to its key's spend in the same
//!   transaction: [`add_spends`] on SQLite (the write lock orders the
//!   writers; in memory while nothing else wrote, see [`SpendMemory`]),
//!   [`spend_cte`] inside PostgreSQL's recording statement (the budget
//!   row's lock orders the replicas). An event of a later period starts the
//!   spend again; one of an earlier period leaves it.
//! - On SQLite the spend is kept in two parts, so that an event does not
//!   write the budget row's page as well as its rollup's: `spend_nanos`, and
//!   the cost in the key's `usage_key_hourly` rows from `rollup_hour` on
//!   (which recording writes anyway, and which sit together, in key order).
//!   An event of the period in those rows changes nothing in `key_budgets`;
//!   the row is written when a period starts, for a late event (an hour
//!   before `rollup_hour`), for one whose cost does not count but is in
//!   those rows, and when the rows to read grow (the older hours are folded
//!   into `spend_nanos`; see `sqlite`). On PostgreSQL
//!   `rollup_hour` is NULL and `spend_nanos` the whole spend.
//! - The spend reaching the budget writes the key's `over_budget_until`
//!   (the period's end: a resolve reads it with the key, and nothing of
//!   this table) and moves `key_changes` in that transaction, so every
//!   cached resolve of the key is read again then; reaching the
//!   soft limit or the budget queues a row in `budget_reports`, which
//!   [`log_reports`] logs once, off the recording path. On PostgreSQL the
//!   recording statement queues the reports (`spend_cte`) and a trigger on
//!   `budget_reports` refuses the key for a report of the budget; on SQLite
//!   [`add_spends`] does all of it.
//!   [`set`] writes `over_budget_until` as the budget it sets stands.

use std::collections::HashMap;

use diesel::prelude::*;

use crate::db::database::{on_backend, Conn, Database};
use crate::db::schema::{budget_reports, key_budgets, keys, usage_key_hourly};
use crate::error::Result;
use crate::model::budget::{Budget, BudgetPeriod, BudgetStatus, FUTURE_SPEND_ALLOWANCE_MS};
use crate::model::key::KeyId;
use crate::model::price::Cost;
use crate::model::time::Timestamp;
use crate::repositories::rollups;

mod memory;
mod sqlite;
pub(crate) use memory::SpendMemory;
pub(crate) use sqlite::{add_spends, Counters};

/// A budget row as stored. The spend of its period is `spend_nanos` plus,
/// when `rollup_hour` is set, the cost in the key's rollups from that hour
/// on ([`kept_spend`]).
#[derive(Debug, Clone, Copy, Insertable, AsChangeset, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = key_budgets, treat_none_as_null = true)]
pub(crate) struct BudgetRow {
    key_row_id: i64,
    budget_nanos: i64,
    soft_nanos: Option<i64>,
    period_days: Option<i32>,
    anchor: i64,
    period_start: i64,
    spend_nanos: i64,
    rollup_hour: Option<i64>,
}

impl BudgetRow {
    /// The budget it holds.
    pub(crate) fn budget(&self) -> Budget {
        budget_of(
            self.budget_nanos,
            self.soft_nanos,
            self.period_days,
            self.anchor,
        )
    }

    /// Until when resolving the key is refused, as of this row and the
    /// spend of its period.
    fn refused_until(&self, spend: i64) -> Option<Timestamp> {
        self.budget()
            .refused_until(Timestamp::from_stored(self.period_start), Cost(spend))
    }
}

fn budget_of(
    budget_nanos: i64,
    soft_nanos: Option<i64>,
    period_days: Option<i32>,
    anchor: i64,
) -> Budget {
    Budget {
        limit: Cost(budget_nanos),
        soft_limit: soft_nanos.map(Cost),
        period: BudgetPeriod::from_stored(period_days, anchor),
    }
}

/// Sets the budget of the key with this row id (`None` removes it), inside
/// the caller's write transaction. The spend of the current period is what
/// the key's events already recorded in it cost.
pub(crate) fn set(
    conn: &mut Conn<'_>,
    key_row_id: i64,
    budget: Option<&Budget>,
    now: Timestamp,
) -> Result<()> {
    let Some(budget) = budget else {
        on_backend!(conn, |c| diesel::delete(
            key_budgets::table.filter(key_budgets::key_row_id.eq(key_row_id))
        )
        .execute(c))?;
        return refuse_until(conn, key_row_id, None);
    };
    // The spend read below counts every event of the period, and every
    // event after it finds the budget.
    conn.hold_off_recorders()?;
    let (start, end) = current_period(budget, now);
    // What recording counts: nothing from too far ahead of the clock.
    let until = end.min(now.plus_millis(FUTURE_SPEND_ALLOWANCE_MS));
    let spend = rollups::key_cost(conn, key_row_id, start.as_millis(), until.as_millis())?;
    write(conn, key_row_id, budget, start, spend)
}

/// Gives a key created in the caller's transaction its budget: it has no
/// events, so nothing is counted and no recorder is held off.
pub(crate) fn set_for_new_key(
    conn: &mut Conn<'_>,
    key_row_id: i64,
    budget: &Budget,
    now: Timestamp,
) -> Result<()> {
    write(conn, key_row_id, budget, current_period(budget, now).0, 0)
}

/// The start and end of the budget's period at `now`; before a fixed-days
/// budget's first period, that first period.
fn current_period(budget: &Budget, now: Timestamp) -> (Timestamp, Timestamp) {
    let start = budget.period.start_of(now).unwrap_or(match budget.period {
        BudgetPeriod::Days { from, .. } => from,
        BudgetPeriod::Day | BudgetPeriod::Month => now,
    });
    (start, budget.period.end_after(start))
}

/// Writes the key's budget row, its period starting at `start` with
/// `spend` spent.
fn write(
    conn: &mut Conn<'_>,
    key_row_id: i64,
    budget: &Budget,
    start: Timestamp,
    spend: i64,
) -> Result<()> {
    let (period_days, anchor) = budget.period.stored();
    // On SQLite the rollups from the period's first hour on hold the rest.
    let (spend_nanos, rollup_hour) = match conn {
        Conn::Sqlite(_) => {
            let hour = start.hour();
            (
                spend.saturating_sub(rolled_since(conn, key_row_id, hour)?),
                Some(hour),
            )
        }
        #[cfg(feature = "postgres")]
        Conn::Postgres(_) => (spend, None),
    };
    let row = BudgetRow {
        key_row_id,
        budget_nanos: budget.limit.nanos(),
        soft_nanos: budget.soft_limit.map(Cost::nanos),
        period_days,
        anchor,
        period_start: start.as_millis(),
        spend_nanos,
        rollup_hour,
    };
    on_backend!(conn, |c| diesel::insert_into(key_budgets::table)
        .values(&row)
        .on_conflict(key_budgets::key_row_id)
        .do_update()
        .set(&row)
        .execute(c))?;
    refuse_until(conn, key_row_id, row.refused_until(spend))
}

/// What the key's rollups hold of its spend from `hour` on, summed here:
/// SQLite's `SUM` fails on an overflow where recording saturates.
fn rolled_since(conn: &mut Conn<'_>, key_row_id: i64, hour: i64) -> Result<i64> {
    let costs: Vec<i64> = on_backend!(conn, |c| usage_key_hourly::table
        .filter(usage_key_hourly::key_row_id.eq(key_row_id))
        .filter(usage_key_hourly::hour.ge(hour))
        .select(usage_key_hourly::cost_nanos)
        .load(c))?;
    Ok(costs.into_iter().fold(0, i64::saturating_add))
}

/// The spend of the row's period: `spend_nanos`, and what the key's
/// rollups hold of it from `rollup_hour` on.
fn kept_spend(conn: &mut Conn<'_>, row: &BudgetRow) -> Result<i64> {
    let Some(hour) = row.rollup_hour else {
        return Ok(row.spend_nanos);
    };
    Ok(row
        .spend_nanos
        .saturating_add(rolled_since(conn, row.key_row_id, hour)?))
}

/// Writes until when resolving the key is refused for its budget
/// (`keys.over_budget_until`, which a resolve reads with the key).
fn refuse_until(conn: &mut Conn<'_>, key_row_id: i64, until: Option<Timestamp>) -> Result<()> {
    on_backend!(conn, |c| diesel::update(
        keys::table.filter(keys::row_id.eq(key_row_id))
    )
    .set(keys::over_budget_until.eq(until))
    .execute(c))?;
    Ok(())
}

/// The budget of the key with this row id, and where it stands at `now`.
pub(crate) fn status(
    conn: &mut Conn<'_>,
    key_row_id: i64,
    now: Timestamp,
) -> Result<Option<BudgetStatus>> {
    let row: Option<BudgetRow> = on_backend!(conn, |c| key_budgets::table
        .filter(key_budgets::key_row_id.eq(key_row_id))
        .select(BudgetRow::as_select())
        .get_result(c)
        .optional())?;
    let Some(row) = row else {
        return Ok(None);
    };
    let spend = kept_spend(conn, &row)?;
    Ok(Some(row.budget().status_at(
        now,
        Timestamp::from_stored(row.period_start),
        Cost(spend),
    )))
}

/// The start of the period that the event time `ts` falls in, for the
/// budget row `budget`, in PostgreSQL's SQL: the same rule as
/// `BudgetPeriod::start_of` (calendar months in UTC). A month starts on
/// the day `ts` falls on less its day of the month, read from a `DATE`
/// (times are never negative, so the division rounds down): under a
/// third of the time of `date_trunc` on a time zone's timestamp and `extract`'s
/// `NUMERIC`, for an expression the recording statement computes up to
/// seven times for a key whose events it cannot tell are all in the
/// period of its row (see `spend_cte`).
#[cfg(feature = "postgres")]
fn period_start_sql(budget: &str, ts: &str) -> String {
    let day = format!("({ts} / 86400000)");
    let month = format!(
        "({day} - CAST(date_part('day', DATE '1970-01-01' + CAST({day} AS INTEGER)) AS INTEGER) \
         + 1) * 86400000"
    );
    let length = format!("(CAST({budget}.period_days AS BIGINT) * 86400000)");
    format!(
        "(CASE WHEN {budget}.period_days IS NULL THEN {month} \
         ELSE {budget}.anchor + ({ts} - {budget}.anchor) / {length} * {length} END)"
    )
}

/// The part of PostgreSQL's recording statement that adds the events of
/// `rows` (which has `key_row_id`, `ts`, `cost_nanos` and `position`) to
/// their keys' spend: CTEs (`sorted`, `spent`, `reached`, `reported`), one
/// row update per key. The events are totalled per key alone, and the
/// budget row is joined once: nearly always all of a key's events in a
/// batch are of one period, and nearly always of the row's. The latter is
/// told without a date (`current`: the events from the period's start on,
/// less than the shortest period of its kind past it); computing each
/// event's period instead made the budgets' part of the statement about
/// 10 ms slower for a batch of 7,845 keys with monthly budgets
/// (docs/performance.md). A key whose first and last events are not of one
/// period goes through `keytally_spend_across_periods`, which walks its
/// events in time order as [`add_spends`] does on SQLite, reporting each
/// period before the last reaching a limit itself. The function finds the
/// key's events in the whole batch sorted once (`sorted`, run only if some
/// key needs it), where a subquery per key would read the whole batch for
/// each key. `one`: `rows` holds a single event, so there is nothing to
/// total.
///
/// The spend before the events of the key's last period is the spend
/// written less what they cost (`e.c` when all are of one period, else
/// `keytally_spend_in_period`), computed in `RETURNING` from the row as
/// written, so however often PostgreSQL computed the row (a spend stopped
/// at the largest integer makes it less than it was, so a limit reached
/// before may be reported again). From it `reached`
/// finds the keys whose spend reached the soft limit or the budget, and
/// `reported` queues their reports; a report of the budget refuses the key
/// until its period's end and counts as a key change, by the trigger on
/// `budget_reports` (after the statement; for the function's reports, when
/// its insert ends). Done here rather than by triggers on the budget row,
/// whose conditions PostgreSQL prepared for every statement.
#[cfg(feature = "postgres")]
pub(crate) fn spend_cte(rows: &str, one: bool) -> String {
    use crate::model::time::DAY_MS;
    let first = period_start_sql("b", "e.first");
    let last = period_start_sql("b", "e.last");
    // Events from too far ahead of the server's clock spend nothing (the
    // bound computed once per statement).
    let of_events = format!(
        "FROM {rows} AS n WHERE n.cost_nanos IS NOT NULL \
         AND n.ts <= (SELECT CAST(extract(epoch FROM now()) * 1000 AS BIGINT) \
           + {FUTURE_SPEND_ALLOWANCE_MS})"
    );
    // The spend stops at the largest integer, as on SQLite (costs are
    // never negative).
    let max = i64::MAX;
    let added =
        format!("CASE WHEN b.spend_nanos > {max} - e.c THEN {max} ELSE b.spend_nanos + e.c END");
    let in_period = format!("CASE WHEN {last} > b.period_start THEN e.c ELSE {added} END");
    // Nearly always all of a key's events are in the period of its row:
    // told apart with no date computed, by the shortest length of a
    // period (a month has at least 28 days). Else (near a month's end, a
    // new period, a late event, one before a budget's first period) the
    // period of each event is computed.
    let current = format!(
        "(e.first >= b.period_start AND e.last - b.period_start < \
         CASE WHEN b.period_days IS NULL THEN {shortest_month} \
         ELSE CAST(b.period_days AS BIGINT) * {DAY_MS} END)",
        shortest_month = 28 * DAY_MS,
    );
    let (sorted, totals, spend, before) = if one {
        let totals = format!(
            "(SELECT n.key_row_id AS k, n.ts AS first, n.ts AS last, n.cost_nanos AS c \
             {of_events})"
        );
        let before = "b.spend_nanos - e.c".to_owned();
        (String::new(), totals, in_period, before)
    } else {
        let totals = format!(
            "(SELECT n.key_row_id AS k, min(n.ts) AS first, max(n.ts) AS last, \
               CAST(LEAST(sum(n.cost_nanos), {max}) AS BIGINT) AS c \
             {of_events} AND n.key_row_id IS NOT NULL GROUP BY n.key_row_id)"
        );
        // The batch's priced events of keys, sorted by key, time and
        // position, as three rows (keys, times, costs): a CTE, computed
        // once however many of its uses run, and only if one does.
        let order = "n.key_row_id, n.ts, n.position";
        let sorted = format!(
            "sorted AS (SELECT ARRAY[array_agg(n.key_row_id ORDER BY {order}), \
               array_agg(n.ts ORDER BY {order}), array_agg(n.cost_nanos ORDER BY {order})] \
               AS events \
             {of_events} AND n.key_row_id IS NOT NULL), "
        );
        let events = "(SELECT s.events FROM sorted AS s)";
        let one_period = format!("(e.first >= b.anchor AND {first} = {last})");
        let before = format!(
            "CASE WHEN {current} OR {one_period} THEN b.spend_nanos - e.c \
             ELSE b.spend_nanos - keytally_spend_in_period(b.key_row_id, b.period_start, \
               b.period_days, b.anchor, {events}) END"
        );
        let spend = format!(
            "CASE WHEN {one_period} THEN {in_period} \
             ELSE keytally_spend_across_periods(b.key_row_id, b.budget_nanos, b.soft_nanos, \
               b.period_days, b.anchor, b.period_start, b.spend_nanos, {events}) END"
        );
        (sorted, totals, spend, before)
    };
    // In `RETURNING`, `b` is the row as written: its period's start moved,
    // its anchor and length did not, so `one_period` is as in `SET`, and
    // `current` still means that all the key's events are in its period.
    format!(
        "{sorted}spent AS (UPDATE key_budgets AS b SET \
           spend_nanos = CASE WHEN {current} THEN {added} ELSE {spend} END, \
           period_start = CASE WHEN {current} THEN b.period_start \
             ELSE GREATEST({last}, b.period_start) END \
         FROM {totals} AS e \
         WHERE b.key_row_id = e.k \
           AND ({current} OR (e.last >= b.anchor AND {last} >= b.period_start)) \
         RETURNING b.key_row_id AS k, b.spend_nanos AS spend, b.budget_nanos AS budget, \
           b.soft_nanos AS soft, b.period_start AS period, \
           {before} AS before), \
         reached AS (SELECT k, spend, budget, soft, period FROM spent \
           WHERE (spend >= budget AND before < budget) OR (spend >= soft AND before < soft)), \
         reported AS (INSERT INTO budget_reports \
             (key_row_id, period_start, spend_nanos, budget_nanos, soft_nanos) \
           SELECT k, period, spend, budget, soft FROM reached)"
    )
}

/// A limit reached, as recording queued it.
#[derive(Debug, Queryable)]
struct Report {
    id: i64,
    key_row_id: i64,
    period_start: i64,
    spend_nanos: i64,
    budget_nanos: i64,
    soft_nanos: Option<i64>,
}

/// Takes the queued reports of keys reaching their soft limit or their
/// budget out of the database and logs each once (the maintenance thread,
/// every second). Returns how many it logged.
pub(crate) fn log_reports(db: &Database) -> Result<usize> {
    let queued = db.read(|conn| {
        Ok(on_backend!(conn, |c| diesel::select(diesel::dsl::exists(
            budget_reports::table.select(budget_reports::id)
        ))
        .get_result::<bool>(c))?)
    })?;
    if !queued {
        return Ok(0);
    }
    let reports = db.write(|conn| {
        let reports: Vec<Report> = match conn {
            Conn::Sqlite(c) => budget_reports::table
                .order(budget_reports::id)
                .limit(1_000)
                .load(*c)?,
            // Replicas drain the queue at once: each takes the rows no
            // other holds.
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => budget_reports::table
                .order(budget_reports::id)
                .limit(1_000)
                .for_update()
                .skip_locked()
                .load(*c)?,
        };
        let ids: Vec<i64> = reports.iter().map(|report| report.id).collect();
        on_backend!(conn, |c| diesel::delete(
            budget_reports::table.filter(budget_reports::id.eq_any(&ids))
        )
        .execute(c))?;
        let rows: Vec<i64> = reports.iter().map(|report| report.key_row_id).collect();
        let keys: HashMap<i64, KeyId> = on_backend!(conn, |c| keys::table
            .filter(keys::row_id.eq_any(&rows))
            .select((keys::row_id, keys::id))
            .load::<(i64, KeyId)>(c))?
        .into_iter()
        .collect();
        Ok(reports
            .into_iter()
            .map(|report| (keys.get(&report.key_row_id).copied(), report))
            .collect::<Vec<_>>())
    })?;
    for (key, report) in &reports {
        let key = key.map(|key| key.to_string()).unwrap_or_default();
        let spend = Cost(report.spend_nanos);
        let since = Timestamp::from_stored(report.period_start);
        if report.spend_nanos >= report.budget_nanos {
            tracing::warn!(%key, %spend, budget = %Cost(report.budget_nanos), %since,
                "key reached its budget: it does not resolve until its period ends");
        } else {
            let soft_budget = Cost(report.soft_nanos.unwrap_or_default());
            tracing::warn!(%key, %spend, %soft_budget, %since, "key reached its soft budget");
        }
    }
    Ok(reports.len())
}
