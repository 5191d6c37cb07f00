//! Recording events on PostgreSQL: a single statement takes the ids from
//! the `event_ids` sequence, inserts the rows, adds their totals to both
//! rollup tables (grouped on the server, so they equal a recount) and their
//! costs to their keys' budgets (`budgets::spend_cte`).
//!
//! - One event: the statement with scalars ([`RecordOne`]), one round trip.
//! - A few events: the batch as one array per column ([`RecordBatch`]), one
//!   round trip and its own transaction.
//! - From [`COPY_FROM`] events on: the batch is copied (`COPY … FROM STDIN`
//!   in binary, Diesel's `copy_from`) into a temporary table emptied at
//!   commit, and the statement reads it ([`RecordStaged`]): 15 % more
//!   events a second than the arrays for batches of 10,000 (43,668 against
//!   37,970, two runs each, 10,000 keys).

use diesel::sql_types::BigInt;
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use crate::db::sql::{sql_text, FixedSql, Value};
use crate::error::Result;
use crate::model::event::EventId;
use crate::model::price;
use crate::repositories::budgets;
use crate::repositories::event_rows::ValidEvent;
use crate::repositories::rollups;

/// The columns of `events` that a batch gives, in the order of the
/// statement's arrays (the id comes from the sequence).
const COLUMNS: &str = "ts, key_row_id, model_id, upstream_model_id, request_id, prompt_tokens, \
    completion_tokens, cache_read_tokens, cache_creation_tokens, reasoning_tokens, status, \
    latency_ms, error, usage_unknown, thinking_level";

/// The same columns as they are inserted: the counters are `INTEGER`s
/// (the arrays carry them as `BIGINT`s, validated to fit).
const INSERTED: &str = "ts, key_row_id, model_id, upstream_model_id, request_id, \
    CAST(prompt_tokens AS INTEGER), CAST(completion_tokens AS INTEGER), \
    CAST(cache_read_tokens AS INTEGER), CAST(cache_creation_tokens AS INTEGER), \
    CAST(reasoning_tokens AS INTEGER), CAST(status AS INTEGER), CAST(latency_ms AS INTEGER), \
    error, usage_unknown, thinking_level";

/// The statement: `new` (materialized once, so each row takes one id)
/// feeds the insert and both rollup upserts; the ids come back in the
/// batch's order. Timestamps are never negative, so `ts / 3600000` is the
/// hour as `Timestamp::hour` computes it.
fn statement() -> String {
    statement_from(
        &format!(
            "(SELECT * FROM unnest(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         WITH ORDINALITY AS u({COLUMNS}, position))"
        ),
        false,
    )
}

/// The statement reading the batch from `rows`: rows of [`COLUMNS`] and
/// `position` (`one`: a single row). Each event is costed with the price
/// of its model in force at its time, read in the statement itself (see
/// `prices`).
fn statement_from(rows: &str, one: bool) -> String {
    format!(
        "WITH new AS MATERIALIZED (\
           SELECT nextval('event_ids') AS id, u.*, \
             (SELECT {cost} FROM prices AS p WHERE p.model_id = u.model_id \
              AND p.effective_from <= u.ts ORDER BY p.effective_from DESC LIMIT 1) AS cost_nanos \
           FROM {rows} AS u), \
         inserted AS (INSERT INTO events (id, {COLUMNS}, cost_nanos) \
           SELECT id, {INSERTED}, cost_nanos FROM new ORDER BY ts), \
         by_key AS ({by_key}), \
         by_model AS ({by_model}), \
         {spent} \
         SELECT id AS value FROM new ORDER BY position",
        spent = budgets::spend_cte("new", one),
        cost = price::cost_sql("u", "p"),
        by_key = rollups::upsert_totals_of(
            "usage_key_hourly",
            &["key_row_id", "hour", "model_id"],
            &["coalesce(key_row_id, 0)", "ts / 3600000", "model_id"],
            "new"
        ),
        by_model = rollups::upsert_totals_of(
            "usage_model_hourly",
            &["hour", "model_id"],
            &["ts / 3600000", "model_id"],
            "new"
        ),
    )
}

sql_text!(
    /// Records a batch of events with their rollups; see [`statement`].
    RecordBatch = statement()
);
/// The smallest batch that is copied rather than sent as arrays. Measured
/// (events a second, two runs each, 10,000 keys): batches of 63 as arrays
/// 22,428, of 64 copied 17,932 (the copy's extra round trips: the table,
/// the copy, the transaction); 999 as arrays 31,641, 1,000 copied 32,743;
/// 10,000 copied 15 % ahead.
pub(crate) const COPY_FROM: usize = 1_000;

sql_text!(
    /// The same, from the rows copied into `keytally_staging`.
    RecordStaged = statement_from("keytally_staging", false)
);

diesel::table! {
    /// A batch on its way in: a temporary table per connection, emptied at
    /// every commit.
    keytally_staging (position) {
        position -> BigInt,
        ts -> BigInt,
        key_row_id -> Nullable<BigInt>,
        model_id -> BigInt,
        upstream_model_id -> Nullable<BigInt>,
        request_id -> Nullable<Text>,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        cache_read_tokens -> BigInt,
        cache_creation_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        status -> BigInt,
        latency_ms -> BigInt,
        error -> Nullable<Text>,
        usage_unknown -> Bool,
        thinking_level -> Nullable<Text>,
    }
}

#[derive(diesel::Insertable)]
#[diesel(table_name = keytally_staging, treat_none_as_default_value = false)]
struct Staged<'a> {
    position: i64,
    ts: i64,
    key_row_id: Option<i64>,
    model_id: i64,
    upstream_model_id: Option<i64>,
    request_id: Option<&'a str>,
    prompt_tokens: i64,
    completion_tokens: i64,
    cache_read_tokens: i64,
    cache_creation_tokens: i64,
    reasoning_tokens: i64,
    status: i64,
    latency_ms: i64,
    error: Option<&'a str>,
    usage_unknown: bool,
    thinking_level: Option<&'a str>,
}

/// Records a batch through `COPY` into the staging table, then the same
/// statement as [`insert`] reading from it; inside the caller's
/// transaction.
pub(crate) fn insert_copied(
    conn: &mut PgConnection,
    valid: &[ValidEvent<'_>],
) -> Result<Vec<EventId>> {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::ExecuteCopyFromDsl;
    conn.batch_execute(
        "CREATE TEMPORARY TABLE IF NOT EXISTS keytally_staging (position BIGINT, ts BIGINT, \
         key_row_id BIGINT, model_id BIGINT, upstream_model_id BIGINT, request_id TEXT, \
         prompt_tokens BIGINT, completion_tokens BIGINT, cache_read_tokens BIGINT, \
         cache_creation_tokens BIGINT, reasoning_tokens BIGINT, status BIGINT, latency_ms BIGINT, \
         error TEXT, usage_unknown BOOLEAN, thinking_level TEXT) ON COMMIT DELETE ROWS",
    )?;
    let rows: Vec<Staged<'_>> = valid
        .iter()
        .enumerate()
        .map(|(position, valid)| {
            let event = &valid.event;
            Staged {
                position: position as i64 + 1,
                ts: event.ts.as_millis(),
                key_row_id: valid.key_row_id,
                model_id: valid.model_id,
                upstream_model_id: valid.upstream_model_id,
                request_id: event.request_id.as_deref(),
                prompt_tokens: event.prompt_tokens,
                completion_tokens: event.completion_tokens,
                cache_read_tokens: event.cache_read_tokens,
                cache_creation_tokens: event.cache_creation_tokens,
                reasoning_tokens: event.reasoning_tokens,
                status: event.status,
                latency_ms: event.latency_ms,
                error: event.error.as_deref(),
                usage_unknown: event.usage_unknown,
                thinking_level: event.thinking_level.as_deref(),
            }
        })
        .collect();
    diesel::copy_from(keytally_staging::table)
        .from_insertable(&rows)
        .execute(conn)?;
    let rows = FixedSql::<RecordStaged>::new(Vec::new()).load::<IdRow>(conn)?;
    Ok(ids_of(rows))
}
sql_text!(
    /// Records one event with its rollups: the same statement as
    /// [`RecordBatch`], its one row given as scalars, with no arrays to
    /// unpack, which a single event (the request path) does not need.
    RecordOne = statement_from(
        "(SELECT CAST(? AS BIGINT) AS ts, CAST(? AS BIGINT) AS key_row_id, \
          CAST(? AS BIGINT) AS model_id, CAST(? AS BIGINT) AS upstream_model_id, \
          CAST(? AS TEXT) AS request_id, CAST(? AS BIGINT) AS prompt_tokens, \
          CAST(? AS BIGINT) AS completion_tokens, CAST(? AS BIGINT) AS cache_read_tokens, \
          CAST(? AS BIGINT) AS cache_creation_tokens, CAST(? AS BIGINT) AS reasoning_tokens, \
          CAST(? AS BIGINT) AS status, CAST(? AS BIGINT) AS latency_ms, \
          CAST(? AS TEXT) AS error, CAST(? AS BOOLEAN) AS usage_unknown, \
          CAST(? AS TEXT) AS thinking_level, CAST(1 AS BIGINT) AS position)",
        true
    )
);

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

/// The ids of the recorded events, in their order.
fn ids_of(rows: Vec<IdRow>) -> Vec<EventId> {
    rows.into_iter().map(|row| EventId(row.value)).collect()
}

/// The batch's columns, one vector each.
#[derive(Default)]
struct Columns<'a> {
    ts: Vec<i64>,
    key_row_id: Vec<Option<i64>>,
    model_id: Vec<i64>,
    upstream_model_id: Vec<Option<i64>>,
    request_id: Vec<Option<&'a str>>,
    counters: [Vec<i64>; 7],
    error: Vec<Option<&'a str>>,
    usage_unknown: Vec<bool>,
    thinking_level: Vec<Option<&'a str>>,
}

/// Inserts validated events and adds them to the rollups, in one
/// statement; returns their ids, in their order.
pub(crate) fn insert(conn: &mut PgConnection, valid: &[ValidEvent<'_>]) -> Result<Vec<EventId>> {
    if let [one] = valid {
        return insert_one(conn, one);
    }
    let mut columns = Columns::default();
    for valid in valid {
        let event = &valid.event;
        columns.ts.push(event.ts.as_millis());
        columns.key_row_id.push(valid.key_row_id);
        columns.model_id.push(valid.model_id);
        columns.upstream_model_id.push(valid.upstream_model_id);
        columns.request_id.push(event.request_id.as_deref());
        for (column, value) in columns.counters.iter_mut().zip([
            event.prompt_tokens,
            event.completion_tokens,
            event.cache_read_tokens,
            event.cache_creation_tokens,
            event.reasoning_tokens,
            event.status,
            event.latency_ms,
        ]) {
            column.push(value);
        }
        columns.error.push(event.error.as_deref());
        columns.usage_unknown.push(event.usage_unknown);
        columns.thinking_level.push(event.thinking_level.as_deref());
    }
    let mut values = vec![
        Value::IntArray(&columns.ts),
        Value::NullableIntArray(&columns.key_row_id),
        Value::IntArray(&columns.model_id),
        Value::NullableIntArray(&columns.upstream_model_id),
        Value::NullableTextArray(&columns.request_id),
    ];
    values.extend(columns.counters.iter().map(|c| Value::IntArray(c)));
    values.extend([
        Value::NullableTextArray(&columns.error),
        Value::BoolArray(&columns.usage_unknown),
        Value::NullableTextArray(&columns.thinking_level),
    ]);
    let rows = FixedSql::<RecordBatch>::new(values).load::<IdRow>(conn)?;
    Ok(ids_of(rows))
}

/// [`insert`] for one event.
fn insert_one(conn: &mut PgConnection, valid: &ValidEvent<'_>) -> Result<Vec<EventId>> {
    let rows = FixedSql::<RecordOne>::new(valid.column_values().to_vec()).load::<IdRow>(conn)?;
    Ok(ids_of(rows))
}

/// Whether a batch whose commit was cut off by a lost connection is stored:
/// `Some(true)` if every event is there under the id it was given, with its
/// time, model and request id; `Some(false)` if none is; `None` if only
/// some match (a server that crashed can hand out again the ids of events
/// it had not committed, so an id alone proves nothing).
pub(crate) fn stored(
    conn: &mut PgConnection,
    valid: &[ValidEvent<'_>],
    ids: &[EventId],
) -> Result<Option<bool>> {
    use diesel::sql_types::{Array, Nullable, Text};
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let numbers: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    let times: Vec<i64> = valid.iter().map(|v| v.event.ts.as_millis()).collect();
    let models: Vec<i64> = valid.iter().map(|v| v.model_id).collect();
    let requests: Vec<Option<&str>> = valid
        .iter()
        .map(|v| v.event.request_id.as_deref())
        .collect();
    let found: Found = diesel::sql_query(
        "SELECT count(*) AS n FROM events e \
         JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[]) \
           AS b(id, ts, model_id, request_id) \
         ON e.id = b.id AND e.ts = b.ts AND e.model_id = b.model_id \
         AND e.request_id IS NOT DISTINCT FROM b.request_id",
    )
    .bind::<Array<BigInt>, _>(&numbers)
    .bind::<Array<BigInt>, _>(&times)
    .bind::<Array<BigInt>, _>(&models)
    .bind::<Array<Nullable<Text>>, _>(&requests)
    .get_result(conn)?;
    Ok(match usize::try_from(found.n) {
        Ok(0) => Some(false),
        Ok(n) if n == numbers.len() => Some(true),
        _ => None,
    })
}
