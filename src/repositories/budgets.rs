//! The `key_budgets` table: a key's budget and the running spend of its
//! current period, kept as events are recorded so that resolving a key
//! never reads events or rollups.
//!
//! - [`set`] writes or removes a budget inside the caller's key change, its
//!   spend counted once from the key's events already in the period.
//! - Recording adds each event's cost to its key's spend in the same
//!   transaction: [`add_spend`] per event on SQLite (the write lock orders
//!   the writers), [`spend_cte`] inside PostgreSQL's recording statement
//!   (the budget row's lock orders the replicas). An event of a later
//!   period starts the spend again; one of an earlier period leaves it.
//! - The spend reaching the budget moves `key_changes` (a trigger), so
//!   every cached resolve of the key is read again then; [`report`] logs
//!   the soft limit and the budget being reached, once each a period.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable};

use crate::db::database::{on_backend, Backend, Conn};
use crate::db::schema::key_budgets;
use crate::db::sql::{sql_text, FixedSql, Value};
use crate::error::Result;
use crate::model::budget::{Budget, BudgetPeriod, BudgetStatus};
use crate::model::key::KeyId;
use crate::model::price::Cost;
use crate::model::time::Timestamp;
use crate::repositories::rollups;

/// A budget row as stored.
#[derive(Debug, Clone, Copy, Insertable, AsChangeset, Queryable, Selectable)]
#[diesel(table_name = key_budgets, treat_none_as_null = true)]
pub(crate) struct BudgetRow {
    key_row_id: i64,
    budget_nanos: i64,
    soft_nanos: Option<i64>,
    period_days: Option<i32>,
    anchor: i64,
    period_start: i64,
    spend_nanos: i64,
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

    /// Until when resolving the key is refused, as of this row.
    pub(crate) fn refused_until(&self) -> Option<Timestamp> {
        self.budget().refused_until(
            Timestamp::from_stored(self.period_start),
            Cost(self.spend_nanos),
        )
    }

    fn status_at(&self, now: Timestamp) -> BudgetStatus {
        self.budget().status_at(
            now,
            Timestamp::from_stored(self.period_start),
            Cost(self.spend_nanos),
        )
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
        return Ok(());
    };
    #[cfg(feature = "postgres")]
    if let Conn::Postgres(c) = conn {
        // Recorders wait until this commits, and this waits for those under
        // way: the spend read below counts every event of the period, and
        // every event after it finds the budget.
        diesel::connection::SimpleConnection::batch_execute(
            &mut **c,
            "LOCK TABLE events IN SHARE MODE",
        )?;
    }
    let (period_days, anchor) = budget.period.stored();
    // Before a fixed-days budget's first period, it waits at its start.
    let start = budget
        .period
        .start_of(now)
        .unwrap_or(Timestamp::from_stored(anchor));
    let end = budget.period.end_after(start);
    let spend =
        rollups::key_totals(conn, key_row_id, start.as_millis(), end.as_millis())?.cost_nanos;
    let row = BudgetRow {
        key_row_id,
        budget_nanos: budget.limit.nanos(),
        soft_nanos: budget.soft_limit.map(Cost::nanos),
        period_days,
        anchor,
        period_start: start.as_millis(),
        spend_nanos: spend,
    };
    on_backend!(conn, |c| diesel::insert_into(key_budgets::table)
        .values(&row)
        .on_conflict(key_budgets::key_row_id)
        .do_update()
        .set(&row)
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
    Ok(row.map(|row| row.status_at(now)))
}

/// The start of the period that the event time `ts` falls in, for the
/// budget row `budget`, in SQL: the same rule as `BudgetPeriod::start_of`
/// (calendar months in UTC by the backend's own date functions).
fn period_start_sql(backend: Backend, budget: &str, ts: &str) -> String {
    let month = match backend {
        Backend::Sqlite => format!(
            "CAST(strftime('%s', {ts} / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000"
        ),
        Backend::Postgres => format!(
            "CAST(extract(epoch FROM date_trunc('month', to_timestamp({ts} / 1000) \
             AT TIME ZONE 'UTC')) AS BIGINT) * 1000"
        ),
    };
    let length = format!("(CAST({budget}.period_days AS BIGINT) * 86400000)");
    format!(
        "(CASE WHEN {budget}.period_days IS NULL THEN {month} \
         ELSE {budget}.anchor + ({ts} - {budget}.anchor) / {length} * {length} END)"
    )
}

/// The new spend and period of a budget row that an event (or a group of
/// events, alias `e`, columns `s`: their period's start, `c`: their cost)
/// is added to, as the `SET` list of an `UPDATE` of `budget`.
fn spend_assignments(budget: &str) -> String {
    format!(
        "spend_nanos = CASE WHEN e.s > {budget}.period_start THEN e.c \
           ELSE {budget}.spend_nanos + e.c END, \
         period_start = CASE WHEN e.s > {budget}.period_start THEN e.s \
           ELSE {budget}.period_start END"
    )
}

sql_text!(
    /// Adds one event's cost (key row id, time, cost) to its key's budget,
    /// if it has one and the event is not of an earlier period; returns the
    /// budget and the spend after.
    AddSpend = format!(
        "UPDATE key_budgets SET {assignments} \
         FROM (SELECT v.k, v.c, {start} AS s FROM (SELECT ? AS k, ? AS t, ? AS c) AS v \
           JOIN key_budgets AS b ON b.key_row_id = v.k WHERE v.t >= b.anchor) AS e \
         WHERE key_budgets.key_row_id = e.k AND e.s >= key_budgets.period_start \
         RETURNING spend_nanos, budget_nanos, soft_nanos, period_days, anchor",
        assignments = spend_assignments("key_budgets"),
        start = period_start_sql(Backend::Sqlite, "b", "v.t"),
    )
);

/// A budget after events were added to its spend.
#[derive(Debug, QueryableByName)]
pub(crate) struct Spent {
    #[diesel(sql_type = BigInt)]
    spend_nanos: i64,
    #[diesel(sql_type = BigInt)]
    budget_nanos: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    soft_nanos: Option<i64>,
    #[diesel(sql_type = Nullable<Integer>)]
    period_days: Option<i32>,
    #[diesel(sql_type = BigInt)]
    anchor: i64,
}

/// Adds one recorded event's cost to its key's spend, inside SQLite's write
/// transaction; logs a limit it reaches.
pub(crate) fn add_spend(
    conn: &mut diesel::SqliteConnection,
    key: Option<KeyId>,
    key_row_id: i64,
    ts: Timestamp,
    cost: Cost,
) -> Result<()> {
    let spent: Option<Spent> = FixedSql::<AddSpend>::new(vec![
        Value::Int(key_row_id),
        Value::Int(ts.as_millis()),
        Value::Int(cost.nanos()),
    ])
    .get_result(conn)
    .optional()?;
    if let Some(spent) = spent {
        report(key, &spent, cost);
    }
    Ok(())
}

/// The part of PostgreSQL's recording statement that adds the events of
/// `rows` (which has `position`, `key_row_id`, `ts` and `cost_nanos`) to
/// their keys' spend: a `spent` CTE returning, per key, the position of its
/// last event, the cost added (`added`) and the budget after.
#[cfg(feature = "postgres")]
pub(crate) fn spend_cte(rows: &str) -> String {
    format!(
        "spent AS (UPDATE key_budgets AS b SET {assignments} \
         FROM (SELECT DISTINCT ON (k) k, s, c, position FROM (\
             SELECT n.key_row_id AS k, {start} AS s, CAST(sum(n.cost_nanos) AS BIGINT) AS c, \
               max(n.position) AS position \
             FROM {rows} AS n JOIN key_budgets AS kb ON kb.key_row_id = n.key_row_id \
             WHERE n.cost_nanos IS NOT NULL AND n.ts >= kb.anchor GROUP BY 1, 2) AS g \
           ORDER BY k, s DESC) AS e \
         WHERE b.key_row_id = e.k AND e.s >= b.period_start \
         RETURNING e.position, e.c AS added, b.spend_nanos, b.budget_nanos, \
           b.soft_nanos, b.period_days, b.anchor)",
        assignments = spend_assignments("b"),
        start = period_start_sql(Backend::Postgres, "kb", "n.ts"),
    )
}

/// The columns of `spent` that the recording statement returns beside
/// each id (NULL for an event that was not the last of its key's).
#[cfg(feature = "postgres")]
pub(crate) const SPENT_COLUMNS: &str = "spent.added, spent.spend_nanos, spent.budget_nanos, \
    spent.soft_nanos, spent.period_days, spent.anchor";

/// What PostgreSQL's recording statement returns of `spent` for an event.
#[cfg(feature = "postgres")]
#[derive(Debug, QueryableByName)]
pub(crate) struct SpentColumns {
    #[diesel(sql_type = Nullable<BigInt>)]
    added: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    spend_nanos: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    budget_nanos: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    soft_nanos: Option<i64>,
    #[diesel(sql_type = Nullable<Integer>)]
    period_days: Option<i32>,
    #[diesel(sql_type = Nullable<BigInt>)]
    anchor: Option<i64>,
}

#[cfg(feature = "postgres")]
impl SpentColumns {
    /// Logs a limit the key of this event reached.
    pub(crate) fn report(&self, key: Option<KeyId>) {
        if let (Some(added), Some(spend_nanos), Some(budget_nanos), Some(anchor)) =
            (self.added, self.spend_nanos, self.budget_nanos, self.anchor)
        {
            let spent = Spent {
                spend_nanos,
                budget_nanos,
                soft_nanos: self.soft_nanos,
                period_days: self.period_days,
                anchor,
            };
            report(key, &spent, Cost(added));
        }
    }
}

/// Logs the soft limit or the budget that adding `added` made the spend
/// reach: once a period for each, as the spend only grows within one.
fn report(key: Option<KeyId>, spent: &Spent, added: Cost) {
    let budget = budget_of(
        spent.budget_nanos,
        spent.soft_nanos,
        spent.period_days,
        spent.anchor,
    );
    let spend = Cost(spent.spend_nanos);
    let crossed = budget.crossed(added, spend);
    let key = key.map(|key| key.to_string()).unwrap_or_default();
    if crossed.limit {
        tracing::warn!(%key, %spend, limit = %budget.limit, period = %budget.period,
            "key reached its budget: it does not resolve until the next period");
    } else if crossed.soft {
        tracing::warn!(%key, %spend, soft_limit = ?budget.soft_limit.map(|c| c.to_string()),
            period = %budget.period, "key reached its soft budget");
    }
}
