//! Usage events: the `events` and `models` tables, the hourly rollups kept in
//! the same transactions, and the [`Events`] repository (record, batch,
//! list, prune).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::PoisonError;

use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::BigInt;
use diesel::sqlite::{Sqlite, SqliteValue};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::keys::{self, validate_model_name, KeyId};
use crate::schema::{events, models};
use crate::sql::{sql_text, CachedSql, FixedSql, Value};
use crate::store::Store;
use crate::time::{Timestamp, HOUR_MS};

/// The default number of events deleted per transaction by [`Events::prune`].
pub const DEFAULT_PRUNE_BATCH: u32 = 1_000;
/// The default retention of raw events: 60 days.
pub const DEFAULT_RAW_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(60 * 24 * 3600);
/// The longest error tag accepted, in bytes.
pub const MAX_ERROR_TAG_LEN: usize = 64;
/// The longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// The longest thinking level accepted, in bytes.
pub const MAX_THINKING_LEVEL_LEN: usize = 32;
/// The most events one batch may hold.
pub const MAX_BATCH_LEN: usize = 100_000;

/// An event's id. Ids grow with every event recorded.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, AsExpression, FromSqlRow, Serialize,
)]
#[diesel(sql_type = BigInt)]
#[serde(transparent)]
pub struct EventId(i64);

impl EventId {
    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl ToSql<BigInt, Sqlite> for EventId {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        <i64 as ToSql<BigInt, Sqlite>>::to_sql(&self.0, out)
    }
}

impl FromSql<BigInt, Sqlite> for EventId {
    fn from_sql(value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        Ok(EventId(<i64 as FromSql<BigInt, Sqlite>>::from_sql(value)?))
    }
}

/// One proxied request, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// When the request happened.
    pub ts: Timestamp,
    /// The key that made it; `None` for an unauthenticated request.
    pub key_id: Option<KeyId>,
    /// The model as requested.
    pub model: String,
    /// The model after aliasing, when it differs.
    pub upstream_model: Option<String>,
    /// The gateway's request id, to match traces to events.
    pub request_id: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Prompt tokens read from cache.
    pub cache_read_tokens: i64,
    /// Prompt tokens written to cache.
    pub cache_creation_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// The HTTP status returned.
    pub status: i64,
    /// Time to the full response, in milliseconds.
    pub latency_ms: i64,
    /// A short error tag such as `rate_limited`; never a body.
    pub error: Option<String>,
    /// The upstream did not report usage; the token counts are estimates.
    pub usage_unknown: bool,
    /// The reasoning effort asked for, such as `high`.
    pub thinking_level: Option<String>,
}

impl NewEvent {
    /// A successful (status 200) event for `model` at `ts`, with zero tokens
    /// and latency; set the other fields as needed.
    pub fn new(ts: Timestamp, model: impl Into<String>) -> NewEvent {
        NewEvent {
            ts,
            key_id: None,
            model: model.into(),
            upstream_model: None,
            request_id: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cache_read_tokens: 0,
            cache_creation_tokens: 0,
            reasoning_tokens: 0,
            status: 200,
            latency_ms: 0,
            error: None,
            usage_unknown: false,
            thinking_level: None,
        }
    }

    /// Whether the event counts as an error in usage totals: a status of 400
    /// or more, or an error tag.
    pub fn is_error(&self) -> bool {
        self.status >= 400 || self.error.is_some()
    }
}

/// One line of `keytally events ingest`: the event's fields by their column
/// names, `ts` as RFC 3339 or integer Unix milliseconds.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    ts: TimeField,
    #[serde(default)]
    key_id: Option<String>,
    model: String,
    #[serde(default)]
    upstream_model: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
    #[serde(default)]
    cache_read_tokens: i64,
    #[serde(default)]
    cache_creation_tokens: i64,
    #[serde(default)]
    reasoning_tokens: i64,
    status: i64,
    #[serde(default)]
    latency_ms: i64,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    usage_unknown: bool,
    #[serde(default)]
    thinking_level: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum TimeField {
    Millis(i64),
    Text(String),
}

/// The longest JSON line [`parse_json_line`] reads, in bytes.
pub const MAX_JSON_LINE_LEN: usize = 16 * 1024;

/// Parses one JSON Lines event: an object whose fields are the event's
/// columns (`ts` and `model` and `status` required; `ts` as RFC 3339 or Unix
/// milliseconds; `key_id` a UUID or null). Field values are checked fully
/// when the event is recorded.
///
/// # Errors
///
/// [`Error::InvalidInput`] naming what is wrong.
pub fn parse_json_line(line: &str) -> Result<NewEvent> {
    if line.len() > MAX_JSON_LINE_LEN {
        return Err(Error::InvalidInput {
            field: "line",
            reason: format!("{} bytes, at most {MAX_JSON_LINE_LEN}", line.len()),
        });
    }
    let parsed: EventLine = serde_json::from_str(line).map_err(|e| Error::InvalidInput {
        field: "line",
        reason: e.to_string(),
    })?;
    let ts = match parsed.ts {
        TimeField::Millis(millis) => Timestamp::from_millis(millis)?,
        TimeField::Text(text) => Timestamp::parse(&text)?,
    };
    let key_id = parsed.key_id.map(|id| id.parse::<KeyId>()).transpose()?;
    Ok(NewEvent {
        ts,
        key_id,
        model: parsed.model,
        upstream_model: parsed.upstream_model,
        request_id: parsed.request_id,
        prompt_tokens: parsed.prompt_tokens,
        completion_tokens: parsed.completion_tokens,
        cache_read_tokens: parsed.cache_read_tokens,
        cache_creation_tokens: parsed.cache_creation_tokens,
        reasoning_tokens: parsed.reasoning_tokens,
        status: parsed.status,
        latency_ms: parsed.latency_ms,
        error: parsed.error,
        usage_unknown: parsed.usage_unknown,
        thinking_level: parsed.thinking_level,
    })
}

/// A recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Its id.
    pub id: EventId,
    /// When the request happened.
    pub ts: Timestamp,
    /// The key that made it, if any.
    pub key_id: Option<KeyId>,
    /// The model as requested.
    pub model: String,
    /// The model after aliasing, if it was given.
    pub upstream_model: Option<String>,
    /// The gateway's request id.
    pub request_id: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Prompt tokens read from cache.
    pub cache_read_tokens: i64,
    /// Prompt tokens written to cache.
    pub cache_creation_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// The HTTP status.
    pub status: i64,
    /// Latency in milliseconds.
    pub latency_ms: i64,
    /// The error tag.
    pub error: Option<String>,
    /// Whether the token counts are estimates.
    pub usage_unknown: bool,
    /// The reasoning effort.
    pub thinking_level: Option<String>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = events, check_for_backend(Sqlite))]
struct EventRow {
    id: EventId,
    ts: Timestamp,
    key_row_id: Option<i64>,
    model_id: i64,
    upstream_model_id: Option<i64>,
    request_id: Option<String>,
    prompt_tokens: i32,
    completion_tokens: i32,
    cache_read_tokens: i32,
    cache_creation_tokens: i32,
    reasoning_tokens: i32,
    status: i32,
    latency_ms: i32,
    error: Option<String>,
    usage_unknown: bool,
    thinking_level: Option<String>,
}

/// An event that passed validation, with its model and key resolved to
/// their row ids: ready to insert.
#[derive(Debug, Clone)]
pub(crate) struct PreparedEvent {
    ts: Timestamp,
    key_row_id: Option<i64>,
    model_id: i64,
    upstream_model_id: Option<i64>,
    request_id: Option<String>,
    prompt_tokens: i32,
    completion_tokens: i32,
    cache_read_tokens: i32,
    cache_creation_tokens: i32,
    reasoning_tokens: i32,
    status: i32,
    latency_ms: i32,
    error: Option<String>,
    usage_unknown: bool,
    thinking_level: Option<String>,
}

/// Filters and page for [`Events::list`].
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this key's events.
    pub key: Option<KeyId>,
    /// Only events for this (requested) model.
    pub model: Option<String>,
    /// Only events at or after this time.
    pub since: Option<Timestamp>,
    /// Only events before this time.
    pub until: Option<Timestamp>,
    /// Only events with this status.
    pub status: Option<i64>,
    /// Keyset pagination: only events older than this one (the last of the
    /// previous page), in the newest-first order.
    pub before: Option<EventCursor>,
    /// Page size; default 100, at most 10,000.
    pub limit: Option<u32>,
}

/// A position in the newest-first order of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EventCursor {
    /// The event's time.
    pub ts: Timestamp,
    /// The event's id.
    pub id: EventId,
}

impl Event {
    /// The cursor that continues a listing after this event.
    pub fn cursor(&self) -> EventCursor {
        EventCursor {
            ts: self.ts,
            id: self.id,
        }
    }
}

/// What [`Events::prune`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PruneReport {
    /// Raw events deleted.
    pub events_deleted: u64,
    /// Transactions used (each held the write lock for one batch only).
    pub batches: u64,
}

/// The events repository of a [`Store`]; see [`Store::events`].
#[derive(Debug, Clone, Copy)]
pub struct Events<'a> {
    store: &'a Store,
}

impl<'a> Events<'a> {
    pub(crate) fn new(store: &'a Store) -> Events<'a> {
        Events { store }
    }

    pub(crate) fn store(&self) -> &'a Store {
        self.store
    }

    /// Records one event, with its rollups, committed when this returns.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] (index 0) for a bad field or an unknown key,
    /// or the store's errors. Nothing is written on error.
    pub fn record(&self, event: &NewEvent) -> Result<EventId> {
        let prepared = self.prepare(event).map_err(|reason| at_index(0, reason))?;
        self.store
            .write(|conn| insert_prepared(conn, std::slice::from_ref(&prepared)))
            .map(|ids| ids.first)
    }

    /// Records a batch of events in one transaction: all or nothing. Returns
    /// the ids, which are consecutive, in the batch's order.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] naming the first bad event (nothing is
    /// written), [`Error::InvalidInput`] for more than 100,000 events, or the
    /// store's errors.
    pub fn record_batch(&self, batch: &[NewEvent]) -> Result<Vec<EventId>> {
        if batch.len() > MAX_BATCH_LEN {
            return Err(Error::InvalidInput {
                field: "batch",
                reason: format!("{} events, at most {MAX_BATCH_LEN}", batch.len()),
            });
        }
        // Every event is checked (fields and key) before any new model name
        // is written, so a bad event leaves no trace at all.
        let mut prepared = batch
            .iter()
            .enumerate()
            .map(|(index, event)| self.check(event).map_err(|reason| at_index(index, reason)))
            .collect::<Result<Vec<_>>>()?;
        for (index, (prepared, event)) in prepared.iter_mut().zip(batch).enumerate() {
            self.resolve_models(prepared, event)
                .map_err(|reason| at_index(index, reason))?;
        }
        let ids = self.record_prepared(&prepared)?;
        Ok((0..prepared.len() as i64)
            .map(|offset| EventId(ids.first.0 + offset))
            .collect())
    }

    pub(crate) fn record_prepared(&self, prepared: &[PreparedEvent]) -> Result<InsertedIds> {
        self.store.write(|conn| insert_prepared(conn, prepared))
    }

    /// Validates an event and resolves its model and key to row ids.
    pub(crate) fn prepare(&self, event: &NewEvent) -> std::result::Result<PreparedEvent, Reason> {
        let mut prepared = self.check(event)?;
        self.resolve_models(&mut prepared, event)?;
        Ok(prepared)
    }

    /// Sets the model ids of a checked event, adding new model names.
    fn resolve_models(
        &self,
        prepared: &mut PreparedEvent,
        event: &NewEvent,
    ) -> std::result::Result<(), Reason> {
        prepared.model_id = self.model_id(&event.model)?;
        prepared.upstream_model_id = match &event.upstream_model {
            None => None,
            Some(name) => Some(self.model_id(name)?),
        };
        Ok(())
    }

    /// Validates an event's fields and resolves its key, writing nothing.
    /// The model ids are left unset (0) for [`Events::resolve_models`].
    fn check(&self, event: &NewEvent) -> std::result::Result<PreparedEvent, Reason> {
        let counted = |field: &'static str, value: i64| {
            i32::try_from(value)
                .ok()
                .filter(|value| *value >= 0)
                .ok_or_else(|| {
                    Reason::Field(field, format!("{value} is not between 0 and 2147483647"))
                })
        };
        let prompt_tokens = counted("prompt_tokens", event.prompt_tokens)?;
        let completion_tokens = counted("completion_tokens", event.completion_tokens)?;
        let cache_read_tokens = counted("cache_read_tokens", event.cache_read_tokens)?;
        let cache_creation_tokens = counted("cache_creation_tokens", event.cache_creation_tokens)?;
        let reasoning_tokens = counted("reasoning_tokens", event.reasoning_tokens)?;
        let latency_ms = counted("latency_ms", event.latency_ms)?;
        let status = i32::try_from(event.status)
            .ok()
            .filter(|status| (0..=999).contains(status))
            .ok_or_else(|| {
                Reason::Field(
                    "status",
                    format!("{} is not between 0 and 999", event.status),
                )
            })?;
        validate_model_name(&event.model).map_err(|r| Reason::Field("model", r))?;
        if let Some(upstream) = &event.upstream_model {
            validate_model_name(upstream).map_err(|r| Reason::Field("upstream_model", r))?;
        }
        let error = validate_tag("error", event.error.as_deref(), MAX_ERROR_TAG_LEN)?;
        let thinking_level = validate_tag(
            "thinking_level",
            event.thinking_level.as_deref(),
            MAX_THINKING_LEVEL_LEN,
        )?;
        if let Some(request_id) = &event.request_id {
            if request_id.is_empty()
                || request_id.len() > MAX_REQUEST_ID_LEN
                || request_id.chars().any(char::is_control)
            {
                return Err(Reason::Field(
                    "request_id",
                    format!("must be 1 to {MAX_REQUEST_ID_LEN} bytes without control characters"),
                ));
            }
        }
        let key_row_id = match event.key_id {
            None => None,
            Some(id) => Some(self.key_row_id(id)?),
        };
        Ok(PreparedEvent {
            ts: event.ts,
            key_row_id,
            model_id: 0,
            upstream_model_id: None,
            request_id: event.request_id.clone(),
            prompt_tokens,
            completion_tokens,
            cache_read_tokens,
            cache_creation_tokens,
            reasoning_tokens,
            status,
            latency_ms,
            error,
            usage_unknown: event.usage_unknown,
            thinking_level,
        })
    }

    /// The row id of a key, from the cache or the database.
    fn key_row_id(&self, id: KeyId) -> std::result::Result<i64, Reason> {
        let cache = &self.store.shared().key_rows;
        if let Some(row_id) = cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            return Ok(*row_id);
        }
        let mut conn = self.store.connection().map_err(Reason::Store)?;
        let row_id = keys::row_id_of(&mut conn, id)
            .map_err(Reason::Store)?
            .ok_or_else(|| Reason::Field("key_id", format!("no key with id {id}")))?;
        cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, row_id);
        Ok(row_id)
    }

    /// The id of a model name, from the cache, the database, or a new row.
    /// A new model is committed on its own: a model row nothing refers to
    /// is harmless, and the cache only ever holds committed ids.
    pub(crate) fn model_id(&self, name: &str) -> std::result::Result<i64, Reason> {
        let cache = &self.store.shared().model_ids;
        if let Some(id) = cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            return Ok(*id);
        }
        let id = self
            .store
            .write(|conn| {
                diesel::insert_into(models::table)
                    .values(models::name.eq(name))
                    .on_conflict_do_nothing()
                    .execute(conn)?;
                Ok(models::table
                    .filter(models::name.eq(name))
                    .select(models::id)
                    .get_result::<i64>(conn)?)
            })
            .map_err(Reason::Store)?;
        cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), id);
        Ok(id)
    }

    /// Events newest first, filtered, one page at a time.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad page size, [`Error::KeyNotFound`]
    /// for an unknown key, or the store's errors.
    pub fn list(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        let limit = keys::page_size(filter.limit)?;
        let mut query = events::table
            .select(EventRow::as_select())
            .order((events::ts.desc(), events::id.desc()))
            .limit(i64::from(limit))
            .into_boxed();
        if let Some(key) = filter.key {
            let row_id = self
                .key_row_id(key)
                .map_err(|_| Error::KeyNotFound { id: key })?;
            query = query.filter(events::key_row_id.eq(row_id));
        }
        if let Some(model) = &filter.model {
            match self.existing_model_id(model)? {
                Some(id) => query = query.filter(events::model_id.eq(id)),
                None => return Ok(Vec::new()),
            }
        }
        if let Some(since) = filter.since {
            query = query.filter(events::ts.ge(since));
        }
        if let Some(until) = filter.until {
            query = query.filter(events::ts.lt(until));
        }
        if let Some(status) = filter.status {
            let Ok(status) = i32::try_from(status) else {
                return Ok(Vec::new());
            };
            query = query.filter(events::status.eq(status));
        }
        if let Some(cursor) = filter.before {
            query = query.filter(
                events::ts
                    .lt(cursor.ts)
                    .or(events::ts.eq(cursor.ts).and(events::id.lt(cursor.id))),
            );
        }
        self.store.read(|conn| {
            let rows: Vec<EventRow> = query.load(conn)?;
            let names = model_names(conn)?;
            let mut key_rows: Vec<i64> = rows.iter().filter_map(|row| row.key_row_id).collect();
            key_rows.sort_unstable();
            key_rows.dedup();
            let key_ids = keys::ids_of(conn, &key_rows)?;
            rows.into_iter()
                .map(|row| event_from_row(row, &names, &key_ids))
                .collect()
        })
    }

    /// The id of a model that exists, without creating it.
    pub(crate) fn existing_model_id(&self, name: &str) -> Result<Option<i64>> {
        if let Some(id) = self
            .store
            .shared()
            .model_ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            return Ok(Some(*id));
        }
        let mut conn = self.store.connection()?;
        Ok(models::table
            .filter(models::name.eq(name))
            .select(models::id)
            .get_result(&mut *conn)
            .optional()?)
    }

    /// The row id of a key for a query filter.
    pub(crate) fn key_row_for_query(&self, key: KeyId) -> Result<i64> {
        self.key_row_id(key).map_err(|reason| match reason {
            Reason::Store(error) => error,
            Reason::Field(..) => Error::KeyNotFound { id: key },
        })
    }

    /// Deletes raw events older than `cutoff`, `batch` at a time, each batch
    /// in its own short write transaction so that resolution and recording
    /// are never stalled for long. Rollups are kept.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a zero batch, or the store's errors;
    /// batches deleted before the error stay deleted.
    pub fn prune(&self, cutoff: Timestamp, batch: u32) -> Result<PruneReport> {
        self.prune_with_progress(cutoff, batch, |_| {})
    }

    /// [`Events::prune`], calling `progress` with the running total after
    /// each batch.
    ///
    /// # Errors
    ///
    /// As [`Events::prune`].
    pub fn prune_with_progress(
        &self,
        cutoff: Timestamp,
        batch: u32,
        mut progress: impl FnMut(u64),
    ) -> Result<PruneReport> {
        if batch == 0 {
            return Err(Error::InvalidInput {
                field: "batch",
                reason: "must be at least 1".to_owned(),
            });
        }
        let mut report = PruneReport::default();
        loop {
            let deleted = self
                .store
                .write(|conn| delete_events_before(conn, cutoff, batch))?;
            report.events_deleted += deleted as u64;
            report.batches += 1;
            progress(report.events_deleted);
            if deleted < batch as usize {
                return Ok(report);
            }
            // Let waiting writers in between batches.
            std::thread::yield_now();
        }
    }

    /// Deletes rollup hours that end at or before `cutoff`, in batches of
    /// `batch` rows. Returns the number of rollup rows deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a zero batch, or the store's errors.
    pub fn prune_rollups(&self, cutoff: Timestamp, batch: u32) -> Result<u64> {
        if batch == 0 {
            return Err(Error::InvalidInput {
                field: "batch",
                reason: "must be at least 1".to_owned(),
            });
        }
        let cutoff_hour = cutoff.as_millis().div_euclid(HOUR_MS);
        let mut total = 0u64;
        loop {
            let deleted = self
                .store
                .write(|conn| delete_rollups_before(conn, cutoff_hour, batch))?;
            total += deleted as u64;
            if deleted == 0 {
                return Ok(total);
            }
            std::thread::yield_now();
        }
    }
}

/// Deletes at most `batch` raw events older than `cutoff`, inside the
/// caller's write transaction. Returns how many it deleted.
pub(crate) fn delete_events_before(
    conn: &mut SqliteConnection,
    cutoff: Timestamp,
    batch: u32,
) -> Result<usize> {
    Ok(CachedSql::new(
        "DELETE FROM events WHERE (ts, id) IN \
         (SELECT ts, id FROM events WHERE ts < ? ORDER BY ts, id LIMIT ?)",
        vec![cutoff.as_millis(), i64::from(batch)],
    )
    .execute(conn)?)
}

/// Deletes at most `batch` rows of each rollup table for hours before
/// `cutoff_hour`, inside the caller's write transaction.
pub(crate) fn delete_rollups_before(
    conn: &mut SqliteConnection,
    cutoff_hour: i64,
    batch: u32,
) -> Result<usize> {
    let by_key = CachedSql::new(
        "DELETE FROM usage_key_hourly WHERE (key_row_id, hour, model_id) IN \
         (SELECT key_row_id, hour, model_id FROM usage_key_hourly WHERE hour < ? LIMIT ?)",
        vec![cutoff_hour, i64::from(batch)],
    )
    .execute(conn)?;
    let by_model = CachedSql::new(
        "DELETE FROM usage_model_hourly WHERE (hour, model_id) IN \
         (SELECT hour, model_id FROM usage_model_hourly WHERE hour < ? LIMIT ?)",
        vec![cutoff_hour, i64::from(batch)],
    )
    .execute(conn)?;
    Ok(by_key + by_model)
}

/// Why an event was rejected.
#[derive(Debug)]
pub(crate) enum Reason {
    /// A field's value.
    Field(&'static str, String),
    /// The store failed while resolving a reference.
    Store(Error),
}

pub(crate) fn at_index(index: usize, reason: Reason) -> Error {
    match reason {
        Reason::Field(field, why) => Error::InvalidEvent {
            index,
            reason: format!("{field}: {why}"),
        },
        Reason::Store(error) => error,
    }
}

fn validate_tag(
    field: &'static str,
    value: Option<&str>,
    max_len: usize,
) -> std::result::Result<Option<String>, Reason> {
    match value {
        None => Ok(None),
        Some(tag)
            if !tag.is_empty()
                && tag.len() <= max_len
                && tag.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(tag.to_owned()))
        }
        Some(_) => Err(Reason::Field(
            field,
            format!("must be a short tag: 1 to {max_len} visible ASCII characters, no spaces"),
        )),
    }
}

/// The ids a batch insert produced: consecutive from `first`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InsertedIds {
    pub(crate) first: EventId,
}

#[derive(Default, Clone, Copy)]
struct Delta {
    requests: i64,
    errors: i64,
    prompt: i64,
    completion: i64,
    cache_read: i64,
    cache_creation: i64,
    reasoning: i64,
    latency_sum: i64,
    latency_max: i64,
}

/// The rollup columns after the key columns, as the upserts below list them.
macro_rules! rollup_upsert {
    ($table:literal, $key:literal, $placeholders:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " (",
            $key,
            ", requests, errors, prompt_tokens, ",
            "completion_tokens, cache_read_tokens, cache_creation_tokens, reasoning_tokens, ",
            "latency_ms_sum, latency_ms_max) VALUES (",
            $placeholders,
            "?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (",
            $key,
            ") DO UPDATE SET ",
            "requests = requests + excluded.requests, errors = errors + excluded.errors, ",
            "prompt_tokens = prompt_tokens + excluded.prompt_tokens, ",
            "completion_tokens = completion_tokens + excluded.completion_tokens, ",
            "cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens, ",
            "cache_creation_tokens = cache_creation_tokens + excluded.cache_creation_tokens, ",
            "reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens, ",
            "latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum, ",
            "latency_ms_max = max(latency_ms_max, excluded.latency_ms_max)"
        )
    };
}

sql_text!(
    /// Adds to one key's hourly usage of one model.
    AddToKeyRollup = rollup_upsert!("usage_key_hourly", "key_row_id, hour, model_id", "?, ?, ?, ")
);
sql_text!(
    /// Adds to one model's hourly usage.
    AddToModelRollup = rollup_upsert!("usage_model_hourly", "hour, model_id", "?, ?, ")
);
sql_text!(
    /// The id the next event gets: ids are given explicitly, so a batch's
    /// are known without reading each one back.
    NextEventId = "SELECT next AS value FROM sequences WHERE name = 'events'"
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
        thinking_level) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
);

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

impl Delta {
    /// The bind values of a rollup upsert: the key columns, then the sums.
    fn binds(&self, key: &[i64]) -> Vec<Value<'static>> {
        let mut binds = Vec::with_capacity(key.len() + 9);
        binds.extend(key.iter().map(|v| Value::Int(*v)));
        binds.extend(
            [
                self.requests,
                self.errors,
                self.prompt,
                self.completion,
                self.cache_read,
                self.cache_creation,
                self.reasoning,
                self.latency_sum,
                self.latency_max,
            ]
            .map(Value::Int),
        );
        binds
    }

    fn add(&mut self, event: &PreparedEvent) {
        self.requests += 1;
        self.errors += i64::from(event.status >= 400 || event.error.is_some());
        self.prompt += i64::from(event.prompt_tokens);
        self.completion += i64::from(event.completion_tokens);
        self.cache_read += i64::from(event.cache_read_tokens);
        self.cache_creation += i64::from(event.cache_creation_tokens);
        self.reasoning += i64::from(event.reasoning_tokens);
        self.latency_sum += i64::from(event.latency_ms);
        self.latency_max = self.latency_max.max(i64::from(event.latency_ms));
    }
}

impl PreparedEvent {
    /// The bind values of [`InsertEvent`].
    fn values(&self, id: i64) -> Vec<Value<'_>> {
        vec![
            Value::Int(id),
            Value::Int(self.ts.as_millis()),
            self.key_row_id.into(),
            Value::Int(self.model_id),
            self.upstream_model_id.into(),
            self.request_id.as_deref().into(),
            Value::Int(i64::from(self.prompt_tokens)),
            Value::Int(i64::from(self.completion_tokens)),
            Value::Int(i64::from(self.cache_read_tokens)),
            Value::Int(i64::from(self.cache_creation_tokens)),
            Value::Int(i64::from(self.reasoning_tokens)),
            Value::Int(i64::from(self.status)),
            Value::Int(i64::from(self.latency_ms)),
            self.error.as_deref().into(),
            Value::Int(i64::from(self.usage_unknown)),
            self.thinking_level.as_deref().into(),
        ]
    }
}

/// Inserts prepared events and adds them to the rollups, inside the
/// caller's write transaction. The events get consecutive ids in their
/// order; the rollup rows are visited in key order, so a batch walks each
/// rollup table once from one end to the other.
pub(crate) fn insert_prepared(
    conn: &mut SqliteConnection,
    prepared: &[PreparedEvent],
) -> Result<InsertedIds> {
    if prepared.is_empty() {
        return Err(Error::InvalidInput {
            field: "batch",
            reason: "it is empty".to_owned(),
        });
    }
    let first = FixedSql::<NextEventId>::new(Vec::new())
        .get_result::<IdRow>(conn)
        .optional()?
        .ok_or_else(|| Error::BadStoredValue {
            message: "the event id sequence is missing from the sequences table".to_owned(),
        })?
        .value;
    let next = i64::try_from(prepared.len())
        .ok()
        .and_then(|len| first.checked_add(len))
        .ok_or_else(|| Error::BadStoredValue {
            message: format!("event ids are exhausted (next id {first})"),
        })?;
    // The table is ordered by time: rows go in in that order, so a batch
    // that arrives slightly out of order still fills each page once.
    let mut order: Vec<usize> = (0..prepared.len()).collect();
    order.sort_by_key(|&offset| prepared[offset].ts);
    for offset in order {
        // `offset` < len and `first + len` did not overflow.
        let id = first + offset as i64;
        FixedSql::<InsertEvent>::new(prepared[offset].values(id)).execute(conn)?;
    }
    FixedSql::<SetNextEventId>::new(vec![Value::Int(next)]).execute(conn)?;
    let mut by_key: BTreeMap<(i64, i64, i64), Delta> = BTreeMap::new();
    let mut by_model: BTreeMap<(i64, i64), Delta> = BTreeMap::new();
    for event in prepared {
        let hour = event.ts.hour();
        by_key
            .entry((event.key_row_id.unwrap_or(0), hour, event.model_id))
            .or_default()
            .add(event);
        by_model
            .entry((hour, event.model_id))
            .or_default()
            .add(event);
    }
    for ((key_row_id, hour, model_id), d) in by_key {
        FixedSql::<AddToKeyRollup>::new(d.binds(&[key_row_id, hour, model_id])).execute(conn)?;
    }
    for ((hour, model_id), d) in by_model {
        FixedSql::<AddToModelRollup>::new(d.binds(&[hour, model_id])).execute(conn)?;
    }
    Ok(InsertedIds {
        first: EventId(first),
    })
}

/// Every model's name by id (the table is small: one row per model name).
pub(crate) fn model_names(conn: &mut SqliteConnection) -> Result<HashMap<i64, String>> {
    Ok(models::table
        .select((models::id, models::name))
        .load::<(i64, String)>(conn)?
        .into_iter()
        .collect())
}

fn event_from_row(
    row: EventRow,
    names: &HashMap<i64, String>,
    key_ids: &HashMap<i64, KeyId>,
) -> Result<Event> {
    let name = |id: i64| {
        names
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::BadStoredValue {
                message: format!(
                    "event {} refers to model id {id}, which does not exist",
                    row.id
                ),
            })
    };
    let key_id = match row.key_row_id {
        None => None,
        Some(key_row) => Some(*key_ids.get(&key_row).ok_or_else(|| Error::BadStoredValue {
            message: format!(
                "event {} refers to key row {key_row}, which does not exist",
                row.id
            ),
        })?),
    };
    Ok(Event {
        id: row.id,
        ts: row.ts,
        key_id,
        model: name(row.model_id)?,
        upstream_model: row.upstream_model_id.map(name).transpose()?,
        request_id: row.request_id,
        prompt_tokens: i64::from(row.prompt_tokens),
        completion_tokens: i64::from(row.completion_tokens),
        cache_read_tokens: i64::from(row.cache_read_tokens),
        cache_creation_tokens: i64::from(row.cache_creation_tokens),
        reasoning_tokens: i64::from(row.reasoning_tokens),
        status: i64::from(row.status),
        latency_ms: i64::from(row.latency_ms),
        error: row.error,
        usage_unknown: row.usage_unknown,
        thinking_level: row.thinking_level,
    })
}
