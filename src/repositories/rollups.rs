//! The hourly rollups, `usage_key_hourly` (per key, hour and model) and
//! `usage_model_hourly` (per hour and model): added to in the transaction
//! that records the events they count, read by usage queries, pruned by
//! retention. [`COLUMNS`] is the one list of their eleven value columns;
//! every statement below, and the usage queries, are built from it.

use std::collections::BTreeMap;

use diesel::{QueryableByName, RunQueryDsl};

use crate::db::database::{on_backend, Conn};
use crate::db::sql::{sql_text, CachedSql, FixedSql, Value};
use crate::error::Result;
use crate::model::event::NewEvent;
use crate::model::price::Cost;
use crate::model::time::HOUR_MS;
use crate::model::usage::Totals;

/// How a rollup column's values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Combine {
    /// Added up.
    Sum,
    /// Added up, stopping at the largest integer: the cost, one event's
    /// value of which may be near it (the highest price times the most
    /// tokens), as SQLite's store saturates a budget's spend.
    SaturatingSum,
    /// The largest kept.
    Max,
}

/// One value column of the rollup tables.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RollupColumn {
    /// The column's name, also the name of the [`Totals`] field.
    pub(crate) name: &'static str,
    /// What one row of `events` adds, as an SQL expression over its columns.
    pub(crate) per_event: &'static str,
    /// How two values combine.
    pub(crate) combine: Combine,
    /// The SQL type that one event's value fits: `INTEGER` for the
    /// request, the error and unpriced flags, the token counts and the
    /// latency (validated to fit 32 bits), `BIGINT` for the cost.
    pub(crate) one_event: &'static str,
}

/// The rollup tables' value columns, in the order of [`Totals::values`].
pub(crate) const COLUMNS: [RollupColumn; 11] = [
    column("requests", "1", Combine::Sum, "INTEGER"),
    column(
        "errors",
        "CASE WHEN status >= 400 OR error IS NOT NULL THEN 1 ELSE 0 END",
        Combine::Sum,
        "INTEGER",
    ),
    column("prompt_tokens", "prompt_tokens", Combine::Sum, "INTEGER"),
    column(
        "completion_tokens",
        "completion_tokens",
        Combine::Sum,
        "INTEGER",
    ),
    column(
        "cache_read_tokens",
        "cache_read_tokens",
        Combine::Sum,
        "INTEGER",
    ),
    column(
        "cache_creation_tokens",
        "cache_creation_tokens",
        Combine::Sum,
        "INTEGER",
    ),
    column(
        "reasoning_tokens",
        "reasoning_tokens",
        Combine::Sum,
        "INTEGER",
    ),
    column("latency_ms_sum", "latency_ms", Combine::Sum, "INTEGER"),
    column("latency_ms_max", "latency_ms", Combine::Max, "INTEGER"),
    column(
        "cost_nanos",
        "coalesce(cost_nanos, 0)",
        Combine::SaturatingSum,
        "BIGINT",
    ),
    column(
        "unpriced_requests",
        "CASE WHEN cost_nanos IS NULL THEN 1 ELSE 0 END",
        Combine::Sum,
        "INTEGER",
    ),
];

const fn column(
    name: &'static str,
    per_event: &'static str,
    combine: Combine,
    one_event: &'static str,
) -> RollupColumn {
    RollupColumn {
        name,
        per_event,
        combine,
        one_event,
    }
}

/// `requests, errors, …`: the value columns of a rollup row.
pub(crate) fn column_list() -> String {
    COLUMNS.map(|column| column.name).join(", ")
}

/// One row of `events` as a rollup row: `1 AS requests, … AS errors, …`,
/// each a `BIGINT` as in the rollup tables (PostgreSQL's event columns
/// are `INTEGER`, and a `UNION` with them would not be).
pub(crate) fn event_as_rollup_row() -> String {
    COLUMNS
        .map(|column| format!("CAST({} AS BIGINT) AS {}", column.per_event, column.name))
        .join(", ")
}

/// One row of `events` as the input of [`upsert_totals_of`]'s totals:
/// each value of the type it fits ([`RollupColumn::one_event`]).
/// PostgreSQL sums `INTEGER`s into a `BIGINT` and a `BIGINT`'s sum is a
/// `NUMERIC`: the nine sums of `INTEGER`s take 11 ms less of a
/// 10,000-event batch's 200 ms.
#[cfg(feature = "postgres")]
fn event_as_summed_row() -> String {
    COLUMNS
        .map(|column| {
            format!(
                "CAST({} AS {}) AS {}",
                column.per_event, column.one_event, column.name
            )
        })
        .join(", ")
}

/// The totals over rollup-shaped rows: `CAST(coalesce(sum(requests), 0)
/// AS BIGINT) AS requests, …` (PostgreSQL sums a `BIGINT` as a `NUMERIC`).
pub(crate) fn totals_of_rows() -> String {
    COLUMNS.map(total_of).join(", ")
}

/// A column's total over rows, as [`totals_of_rows`] lists them.
fn total_of(column: RollupColumn) -> String {
    let function = match column.combine {
        Combine::Sum | Combine::SaturatingSum => "sum",
        Combine::Max => "max",
    };
    format!(
        "CAST(coalesce({function}({0}), 0) AS BIGINT) AS {0}",
        column.name
    )
}

/// `INSERT INTO table (keys…, values…) VALUES (?…) ON CONFLICT (keys…) DO
/// UPDATE` adding the values to the row's.
pub(crate) fn upsert(table: &str, key_columns: &[&str]) -> String {
    let keys = key_columns.join(", ");
    let placeholders = vec!["?"; key_columns.len() + COLUMNS.len()].join(", ");
    format!(
        "INSERT INTO {table} ({keys}, {}) VALUES ({placeholders}) \
         ON CONFLICT ({keys}) DO UPDATE SET {}",
        column_list(),
        updates(table)
    )
}

/// `INSERT INTO table (keys…, values…) SELECT … FROM rows GROUP BY keys
/// ON CONFLICT … DO UPDATE`: adds the totals of `rows` (rows of `events`'
/// columns, by `SELECT` or table name) per group, the groups in key order.
/// `key_expressions` compute the key columns from a row.
#[cfg(feature = "postgres")]
pub(crate) fn upsert_totals_of(
    table: &str,
    key_columns: &[&str],
    key_expressions: &[&str],
    rows: &str,
) -> String {
    let keys = key_columns.join(", ");
    let computed_keys = key_expressions
        .iter()
        .zip(key_columns)
        .map(|(expression, column)| format!("{expression} AS {column}"))
        .collect::<Vec<_>>()
        .join(", ");
    // A group's cost stops at the largest integer, as the row's does.
    let totals = COLUMNS
        .map(|column| match column.combine {
            Combine::SaturatingSum => format!(
                "CAST(LEAST(sum({0}), {max}) AS BIGINT) AS {0}",
                column.name,
                max = i64::MAX
            ),
            Combine::Sum | Combine::Max => total_of(column),
        })
        .join(", ");
    format!(
        "INSERT INTO {table} ({keys}, {columns}) \
         SELECT {keys}, {totals} FROM (SELECT {computed_keys}, {per_event} FROM {rows}) AS e \
         GROUP BY {keys} ORDER BY {keys} \
         ON CONFLICT ({keys}) DO UPDATE SET {updates}",
        columns = column_list(),
        per_event = event_as_summed_row(),
        updates = updates(table)
    )
}

/// The `SET` list of an upsert: each value combined with the row's.
fn updates(table: &str) -> String {
    COLUMNS
        .map(|column| match column.combine {
            // The row's own columns are named with the table: PostgreSQL
            // finds a bare name ambiguous beside `excluded`.
            Combine::Sum => format!("{0} = {table}.{0} + excluded.{0}", column.name),
            // Neither value is negative.
            Combine::SaturatingSum => format!(
                "{0} = CASE WHEN {table}.{0} > {max} - excluded.{0} THEN {max} \
                 ELSE {table}.{0} + excluded.{0} END",
                column.name,
                max = i64::MAX
            ),
            // SQLite's two-argument max() is PostgreSQL's greatest().
            Combine::Max => format!(
                "{0} = CASE WHEN excluded.{0} > {table}.{0} THEN excluded.{0} ELSE {table}.{0} END",
                column.name
            ),
        })
        .join(", ")
}

sql_text!(
    /// Adds to one key's hourly usage of one model.
    AddToKeyRollup = upsert("usage_key_hourly", &["key_row_id", "hour", "model_id"])
);
sql_text!(
    /// Adds to one model's hourly usage.
    AddToModelRollup = upsert("usage_model_hourly", &["hour", "model_id"])
);

/// An event to count: its hour, key row (0 for none), model id and cost
/// (`None` without a price).
pub(crate) struct Counted<'a> {
    pub(crate) hour: i64,
    pub(crate) key_row_id: i64,
    pub(crate) model_id: i64,
    pub(crate) event: &'a NewEvent,
    pub(crate) cost: Option<Cost>,
}

/// Adds events to both rollup tables, inside the caller's write
/// transaction. Rows are visited in key order, so a batch walks each table
/// once from one end to the other.
pub(crate) fn add<'a>(
    conn: &mut Conn<'_>,
    events: impl IntoIterator<Item = Counted<'a>>,
) -> Result<()> {
    let mut by_key: BTreeMap<(i64, i64, i64), Totals> = BTreeMap::new();
    let mut by_model: BTreeMap<(i64, i64), Totals> = BTreeMap::new();
    for counted in events {
        by_key
            .entry((counted.key_row_id, counted.hour, counted.model_id))
            .or_default()
            .add_event(counted.event, counted.cost);
        by_model
            .entry((counted.hour, counted.model_id))
            .or_default()
            .add_event(counted.event, counted.cost);
    }
    for ((key_row_id, hour, model_id), totals) in by_key {
        let upsert = FixedSql::<AddToKeyRollup>::new(binds(&[key_row_id, hour, model_id], &totals));
        on_backend!(conn, |c| upsert.execute(c))?;
    }
    for ((hour, model_id), totals) in by_model {
        let upsert = FixedSql::<AddToModelRollup>::new(binds(&[hour, model_id], &totals));
        on_backend!(conn, |c| upsert.execute(c))?;
    }
    Ok(())
}

/// The values of an upsert: the key columns, then the totals.
pub(crate) fn binds(key: &[i64], totals: &Totals) -> Vec<Value<'static>> {
    key.iter()
        .copied()
        .chain(totals.values())
        .map(Value::Int)
        .collect()
}

/// Deletes at most `batch` rows of each rollup table for hours before
/// `cutoff_hour`, inside the caller's write transaction. A budget's spend
/// kept in the rows to delete (SQLite's `rollup_hour` before the cutoff,
/// and rows from it on before the cutoff) is first folded into its
/// `spend_nanos`; a budget row with no such rows is left as it is. The fold
/// saturates at the largest integer, as recording does, where SQLite's
/// `SUM` would fail the prune: past 9.2e18 (`TOTAL`, in floating point)
/// the spend is the largest integer; below, the exact sum cannot overflow,
/// costs being never negative. PostgreSQL keeps no spend in its rollups
/// (`rollup_hour` is NULL there).
pub(crate) fn delete_before(conn: &mut Conn<'_>, cutoff_hour: i64, batch: u32) -> Result<usize> {
    if let Conn::Sqlite(c) = conn {
        let rows = "FROM usage_key_hourly AS u WHERE u.key_row_id = key_budgets.key_row_id \
                    AND u.hour >= key_budgets.rollup_hour AND u.hour < ?";
        let fold = CachedSql::new(
            format!(
                "UPDATE key_budgets SET spend_nanos = CASE \
                   WHEN spend_nanos + (SELECT TOTAL(u.cost_nanos) {rows}) >= 9.2e18 \
                     THEN {max} \
                   ELSE spend_nanos + CAST(COALESCE((SELECT SUM(u.cost_nanos) {rows}), 0) \
                     AS BIGINT) END, \
                 rollup_hour = ? WHERE rollup_hour < ? AND EXISTS (SELECT 1 {rows})",
                max = i64::MAX
            ),
            vec![cutoff_hour; 5],
        );
        fold.execute(&mut **c)?;
    }
    let by_key = CachedSql::new(
        "DELETE FROM usage_key_hourly WHERE (key_row_id, hour, model_id) IN \
         (SELECT key_row_id, hour, model_id FROM usage_key_hourly WHERE hour < ? LIMIT ?)",
        vec![cutoff_hour, i64::from(batch)],
    );
    let by_key = on_backend!(conn, |c| by_key.execute(c))?;
    let by_model = CachedSql::new(
        "DELETE FROM usage_model_hourly WHERE (hour, model_id) IN \
         (SELECT hour, model_id FROM usage_model_hourly WHERE hour < ? LIMIT ?)",
        vec![cutoff_hour, i64::from(batch)],
    );
    let by_model = on_backend!(conn, |c| by_model.execute(c))?;
    Ok(by_key + by_model)
}

/// Totals read by [`key_totals`].
#[derive(QueryableByName)]
struct TotalsRow {
    #[diesel(embed)]
    totals: Totals,
}

/// One key's totals over `[since, until)` (Unix milliseconds): whole
/// hours from its rollups, the partial hours at the edges from its raw
/// events, in one statement.
pub(crate) fn key_totals(
    conn: &mut Conn<'_>,
    key_row: i64,
    since: i64,
    until: i64,
) -> Result<Totals> {
    let query = FixedSql::<KeyWindowTotals>::new(window_values(key_row, since, until));
    let row: TotalsRow = on_backend!(conn, |c| query.get_result(c))?;
    Ok(row.totals)
}

/// What one key's events in `[since, until)` cost, read as
/// [`key_totals`] reads them and added up here, stopping at the largest
/// integer as recording does (SQL's `SUM` would fail past it).
pub(crate) fn key_cost(conn: &mut Conn<'_>, key_row: i64, since: i64, until: i64) -> Result<i64> {
    #[derive(QueryableByName)]
    struct CostRow {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        cost_nanos: i64,
    }
    let query = FixedSql::<KeyWindowCosts>::new(window_values(key_row, since, until));
    let rows: Vec<CostRow> = on_backend!(conn, |c| query.load(c))?;
    Ok(rows
        .iter()
        .fold(0, |sum, row| sum.saturating_add(row.cost_nanos)))
}

/// The values of [`KeyWindowTotals`] and [`KeyWindowCosts`] for one key
/// and `[since, until)`: whole hours from its rollups, the partial hours at
/// the edges from its raw events (an edge not needed is an empty window).
fn window_values(key_row: i64, since: i64, until: i64) -> Vec<Value<'static>> {
    let first_whole_hour = since.div_euclid(HOUR_MS) + i64::from(since.rem_euclid(HOUR_MS) != 0);
    let end_whole_hour = until.div_euclid(HOUR_MS);
    let (rollup, left, right) = if first_whole_hour < end_whole_hour {
        (
            (first_whole_hour, end_whole_hour),
            (since, first_whole_hour * HOUR_MS),
            (end_whole_hour * HOUR_MS, until),
        )
    } else {
        ((0, 0), (since, until), (0, 0))
    };
    [
        key_row, rollup.0, rollup.1, key_row, left.0, left.1, key_row, right.0, right.1,
    ]
    .map(Value::Int)
    .to_vec()
}

sql_text!(
    /// One key's totals: whole hours `[?, ?)` from its rollups, and the two
    /// edges from its raw events (an edge not needed is an empty window).
    /// Fixed for the process, so Diesel keeps it prepared by type.
    KeyWindowTotals = format!(
        "SELECT {totals} FROM ({parts}) AS parts",
        totals = totals_of_rows(),
        parts = window_parts(&column_list(), &event_as_rollup_row()),
    )
);

sql_text!(
    /// The same rows' costs, one row each.
    KeyWindowCosts = window_parts("cost_nanos", "coalesce(cost_nanos, 0) AS cost_nanos")
);

/// The rows of one key's window: `rollup` of its rollup rows, then
/// `per_event` of its events at each edge.
fn window_parts(rollup: &str, per_event: &str) -> String {
    format!(
        "SELECT {rollup} FROM usage_key_hourly WHERE key_row_id = ? AND hour >= ? AND hour < ? \
         UNION ALL SELECT {per_event} FROM events WHERE key_row_id = ? AND ts >= ? AND ts < ? \
         UNION ALL SELECT {per_event} FROM events WHERE key_row_id = ? AND ts >= ? AND ts < ?"
    )
}
