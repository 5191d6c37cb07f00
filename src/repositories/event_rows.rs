//! Event rows as they are written: [`ValidEvent`], an event checked and
//! with its key and models resolved to row ids, and its insert with its
//! rollups and then its key's spend on SQLite, ids taken from the `events`
//! counter. PostgreSQL's insert is in `postgres_insert`.

use std::borrow::Cow;

use diesel::sql_types::BigInt;
use diesel::{OptionalExtension, QueryableByName, RunQueryDsl, SqliteConnection};

use crate::db::database::Conn;
use crate::db::sql::{sql_text, FixedSql, Value};
use crate::error::{Error, Result};
use crate::model::budget::FUTURE_SPEND_ALLOWANCE_MS;
use crate::model::event::{EventId, NewEvent};
use crate::model::price::Cost;
use crate::model::time::Timestamp;
use crate::repositories::budgets::{self, SpendMemory};
use crate::repositories::price_memory::PriceMemory;
use crate::repositories::rollups::{self, Counted};

/// An event that passed validation, with its key and models resolved to
/// their row ids: ready to insert. It borrows the caller's event, or owns a
/// copy where it must outlive the call (an `EventSink` queues it).
#[derive(Debug, Clone)]
pub(crate) struct ValidEvent<'a> {
    pub(crate) key_row_id: Option<i64>,
    pub(crate) model_id: i64,
    pub(crate) upstream_model_id: Option<i64>,
    pub(crate) event: Cow<'a, NewEvent>,
}

impl ValidEvent<'_> {
    /// A checked event whose key and models are not resolved yet (row ids
    /// unset), for an `EventSink`'s writer to complete.
    pub(crate) fn unresolved(event: NewEvent) -> ValidEvent<'static> {
        ValidEvent {
            key_row_id: None,
            model_id: 0,
            upstream_model_id: None,
            event: Cow::Owned(event),
        }
    }

    /// The same, owning its event.
    pub(crate) fn into_owned(self) -> ValidEvent<'static> {
        ValidEvent {
            key_row_id: self.key_row_id,
            model_id: self.model_id,
            upstream_model_id: self.upstream_model_id,
            event: Cow::Owned(self.event.into_owned()),
        }
    }
}

sql_text!(
    /// The id the next event gets (ids are given explicitly, so a batch's
    /// are known without reading each one back), the counts of price
    /// changes (see `prices`) and budget changes (see `budgets`), and
    /// whether any key has a budget.
    NextEventId = "SELECT next AS value, \
        (SELECT next FROM sequences WHERE name = 'price_changes') AS price_changes, \
        (SELECT next FROM sequences WHERE name = 'budget_changes') AS budget_changes, \
        EXISTS (SELECT 1 FROM key_budgets) AS budgets \
        FROM sequences WHERE name = 'events'"
);
sql_text!(
    /// Moves the event id sequence past a transaction's events.
    SetNextEventId = "UPDATE sequences SET next = ? WHERE name = 'events'"
);
sql_text!(
    /// Adds one event, its id given.
    InsertEvent = "INSERT INTO events (id, ts, key_row_id, model_id, upstream_model_id, \
        request_id, prompt_tokens, completion_tokens, cache_read_tokens, \
        cache_creation_tokens, reasoning_tokens, status, latency_ms, error, usage_unknown, \
        thinking_level, cost_nanos) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
);

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = BigInt)]
    value: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    price_changes: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    budget_changes: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    budgets: bool,
}

impl ValidEvent<'_> {
    /// The values of [`InsertEvent`], in its columns' order.
    fn values(&self, id: i64, cost: Option<Cost>) -> Vec<Value<'_>> {
        let mut values = vec![Value::Int(id)];
        values.extend(self.column_values());
        values.push(Value::NullableInt(cost.map(Cost::nanos)));
        values
    }

    /// The values of every column of `events` but the id and the cost, in
    /// the table's order.
    pub(crate) fn column_values(&self) -> [Value<'_>; 15] {
        let event = &self.event;
        [
            Value::Int(event.ts.as_millis()),
            Value::NullableInt(self.key_row_id),
            Value::Int(self.model_id),
            Value::NullableInt(self.upstream_model_id),
            Value::NullableText(event.request_id.as_deref()),
            Value::Int(event.prompt_tokens),
            Value::Int(event.completion_tokens),
            Value::Int(event.cache_read_tokens),
            Value::Int(event.cache_creation_tokens),
            Value::Int(event.reasoning_tokens),
            Value::Int(event.status),
            Value::Int(event.latency_ms),
            Value::NullableText(event.error.as_deref()),
            Value::Bool(event.usage_unknown),
            Value::NullableText(event.thinking_level.as_deref()),
        ]
    }
}

/// Inserts validated events and adds them to the rollups, inside the
/// caller's write transaction on SQLite. Returns their ids, in their
/// order.
pub(crate) fn insert(
    conn: &mut SqliteConnection,
    valid: &[ValidEvent<'_>],
    prices: &PriceMemory,
    spend_memory: &SpendMemory,
) -> Result<Vec<EventId>> {
    if valid.is_empty() {
        return Err(Error::InvalidInput {
            field: "batch",
            reason: "it is empty".to_owned(),
        });
    }
    let counters = begin(conn, valid.len())?;
    let ids = counters.ids;
    let costs = prices.costs(
        conn,
        counters.price_changes,
        valid.iter().map(|valid| (valid.model_id, &*valid.event)),
    )?;
    // The table is ordered by time: rows go in in that order, so a batch
    // that arrives slightly out of order still fills each page once.
    let mut order: Vec<usize> = (0..valid.len()).collect();
    order.sort_by_key(|&offset| valid[offset].event.ts);
    for &offset in &order {
        let row = FixedSql::<InsertEvent>::new(valid[offset].values(ids[offset].0, costs[offset]));
        row.execute(conn)?;
    }
    rollups::add(
        &mut Conn::Sqlite(conn),
        valid.iter().zip(&costs).map(|(valid, &cost)| Counted {
            hour: valid.event.ts.hour(),
            key_row_id: valid.key_row_id.unwrap_or(0),
            model_id: valid.model_id,
            event: &valid.event,
            cost,
        }),
    )?;
    // Key by key, after the rollups (which keep part of the spend), each
    // key's events in time order, so that a later period's event starts its
    // spend after the earlier period's were added.
    let mut spends: Vec<(i64, Timestamp, Cost)> = Vec::new();
    if counters.budgets {
        spends = order
            .iter()
            .filter_map(|&offset| {
                let valid = &valid[offset];
                Some((valid.key_row_id?, valid.event.ts, costs[offset]?))
            })
            .collect();
        spends.sort_by_key(|&(key_row_id, ts, _)| (key_row_id, ts));
    }
    let horizon = Timestamp::now().plus_millis(FUTURE_SPEND_ALLOWANCE_MS);
    budgets::add_spends(conn, spend_memory, counters.spend, &spends, horizon)?;
    Ok(ids)
}

/// What a recording transaction reads as it begins.
struct Begun {
    /// The ids of its events.
    ids: Vec<EventId>,
    /// The count of price changes.
    price_changes: i64,
    /// Whether any key has a budget.
    budgets: bool,
    /// What its spend memory is checked with.
    spend: budgets::Counters,
}

/// `count` new, consecutive event ids from the `events` counter, which
/// the write lock keeps to one writer at a time, and the counts the
/// transaction reads with them.
fn begin(conn: &mut SqliteConnection, count: usize) -> Result<Begun> {
    let count = i64::try_from(count).map_err(|_| Error::InvalidInput {
        field: "batch",
        reason: "too many events".to_owned(),
    })?;
    let row = FixedSql::<NextEventId>::new(Vec::new())
        .get_result::<IdRow>(conn)
        .optional()?
        .ok_or_else(|| Error::BadStoredValue {
            message: "the event id sequence is missing from the sequences table".to_owned(),
        })?;
    let first = row.value;
    let price_changes = row.price_changes.ok_or_else(|| Error::BadStoredValue {
        message: "the count of price changes is missing from the sequences table".to_owned(),
    })?;
    let next = first
        .checked_add(count)
        .ok_or_else(|| Error::BadStoredValue {
            message: format!("event ids are exhausted (next id {first})"),
        })?;
    let budget_changes = row.budget_changes.ok_or_else(|| Error::BadStoredValue {
        message: "the count of budget changes is missing from the sequences table".to_owned(),
    })?;
    FixedSql::<SetNextEventId>::new(vec![Value::Int(next)]).execute(conn)?;
    Ok(Begun {
        ids: (first..next).map(EventId).collect(),
        price_changes,
        budgets: row.budgets,
        spend: budgets::Counters {
            events: first,
            budget_changes,
            events_after: next,
        },
    })
}
