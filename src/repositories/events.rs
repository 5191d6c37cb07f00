//! The events repository: the `events` table and [`Events`] (record,
//! record a batch, list, prune). Every event is recorded with its rollups
//! (`rollups`) in one transaction; usage queries are in `usage`.

use std::borrow::Cow;
use std::collections::HashMap;

use diesel::prelude::*;

use crate::db::database::{on_backend, Backend, Conn, Database};
use crate::db::schema::events;
use crate::db::sql::CachedSql;
use crate::error::{Error, Result};
use crate::model::event::{Event, EventFilter, EventId, NewEvent, PruneReport, MAX_BATCH_LEN};
use crate::model::invalid::Invalid;
use crate::model::key::{page_size, KeyId};
use crate::model::price::Cost;
use crate::model::time::{Timestamp, HOUR_MS};
use crate::repositories::event_rows::{self, ValidEvent};
use crate::repositories::keys::{self, KeyMemory, Keys};
use crate::repositories::models::{self, ModelIds};
#[cfg(feature = "postgres")]
use crate::repositories::postgres_insert;
use crate::repositories::rollups;

/// The events repository of a store; see `Store::events`.
#[derive(Debug, Clone, Copy)]
pub struct Events<'a> {
    pub(crate) db: &'a Database,
    keys: &'a KeyMemory,
    pub(crate) models: &'a ModelIds,
}

/// Why an event was refused: one of its fields, or the store failing while
/// resolving its key or model.
#[derive(Debug)]
pub(crate) enum Refused {
    /// A field's value.
    Field(Invalid),
    /// The store failed.
    Store(Error),
}

impl Refused {
    /// The error for the event at `index` of its batch.
    pub(crate) fn at(self, index: usize) -> Error {
        match self {
            Refused::Field(invalid) => Error::InvalidEvent {
                index,
                reason: format!("{}: {}", invalid.field, invalid.reason),
            },
            Refused::Store(error) => error,
        }
    }
}

impl<'a> Events<'a> {
    pub(crate) fn new(db: &'a Database, keys: &'a KeyMemory, models: &'a ModelIds) -> Events<'a> {
        Events { db, keys, models }
    }

    /// Records one event, with its rollups, committed when this returns.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] (index 0) for a bad field or an unknown key,
    /// or the store's errors. Nothing is written on error.
    pub fn record(&self, event: &NewEvent) -> Result<EventId> {
        let valid = self.validate(event).map_err(|refused| refused.at(0))?;
        let valid = self
            .resolve_models(valid)
            .map_err(|refused| refused.at(0))?;
        self.record_valid(std::slice::from_ref(&valid))?
            .first()
            .copied()
            .ok_or_else(|| Error::BadStoredValue {
                message: "recording an event returned no id".to_owned(),
            })
    }

    /// Records a batch of events in one transaction: all or nothing. Returns
    /// the ids in the batch's order: consecutive on SQLite; on PostgreSQL
    /// ascending, and consecutive unless other processes took ids from the
    /// sequence at the same moment.
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
        let checked = batch
            .iter()
            .enumerate()
            .map(|(index, event)| self.validate(event).map_err(|refused| refused.at(index)))
            .collect::<Result<Vec<_>>>()?;
        let valid = checked
            .into_iter()
            .enumerate()
            .map(|(index, valid)| {
                self.resolve_models(valid)
                    .map_err(|refused| refused.at(index))
            })
            .collect::<Result<Vec<_>>>()?;
        self.record_valid(&valid)
    }

    /// Records validated events in one transaction whose outcome is always
    /// known (see `Database::write_settled`): the event sink's writes.
    pub(crate) fn record_valid_settled(&self, valid: &[ValidEvent<'_>]) -> Result<Vec<EventId>> {
        let ids = self.db.write_settled(
            |conn| match conn {
                Conn::Sqlite(conn) => {
                    event_rows::insert(conn, valid, &self.models.prices, &self.keys.spends)
                }
                #[cfg(feature = "postgres")]
                Conn::Postgres(conn) if valid.len() >= postgres_insert::COPY_FROM => {
                    postgres_insert::insert_copied(conn, valid)
                }
                #[cfg(feature = "postgres")]
                Conn::Postgres(conn) => postgres_insert::insert(conn, valid),
            },
            |conn, ids| match conn {
                // SQLite never leaves a commit's outcome unknown.
                Conn::Sqlite(_) => Ok(Some(ids.len() == valid.len())),
                #[cfg(feature = "postgres")]
                Conn::Postgres(conn) => postgres_insert::stored(conn, valid, ids),
            },
        )?;
        self.keys.spends.committed(&ids);
        Ok(ids)
    }

    /// Records validated events in one transaction; returns their ids, in
    /// their order.
    pub(crate) fn record_valid(&self, valid: &[ValidEvent<'_>]) -> Result<Vec<EventId>> {
        let record = |conn: &mut Conn<'_>| match conn {
            Conn::Sqlite(conn) => {
                event_rows::insert(conn, valid, &self.models.prices, &self.keys.spends)
            }
            #[cfg(feature = "postgres")]
            Conn::Postgres(conn) => postgres_insert::insert(conn, valid),
        };
        match self.db.backend() {
            // SQLite: several statements in one write transaction.
            Backend::Sqlite => {
                let ids = self.db.write(record)?;
                self.keys.spends.committed(&ids);
                Ok(ids)
            }
            // PostgreSQL, a large batch: copied, then one statement, in a
            // transaction.
            #[cfg(feature = "postgres")]
            Backend::Postgres if valid.len() >= postgres_insert::COPY_FROM => {
                self.db.write(|conn| match conn {
                    Conn::Postgres(conn) => postgres_insert::insert_copied(conn, valid),
                    Conn::Sqlite(conn) => {
                        event_rows::insert(conn, valid, &self.models.prices, &self.keys.spends)
                    }
                })
            }
            // PostgreSQL, a few events: one statement, its own transaction.
            #[cfg(feature = "postgres")]
            Backend::Postgres => self.db.write_statement(record),
            #[cfg(not(feature = "postgres"))]
            Backend::Postgres => Err(Error::PostgresNotBuilt),
        }
    }

    /// Validates an event and resolves its key and models to row ids,
    /// adding new model names.
    pub(crate) fn prepare<'e>(&self, event: &'e NewEvent) -> Result<ValidEvent<'e>, Refused> {
        self.resolve_models(self.validate(event)?)
    }

    /// Checks an event's fields and resolves its key and models from memory
    /// alone, never waiting on the database: `Ok(Some)` when the key and the
    /// models were seen before by this store, `Ok(None)` when one of them
    /// has to be looked up (or a new model name added) by [`Self::prepare`].
    pub(crate) fn prepare_in_memory<'e>(
        &self,
        event: &'e NewEvent,
    ) -> Result<Option<ValidEvent<'e>>, Refused> {
        event.validate().map_err(Refused::Field)?;
        let key_row_id = match event.key_id {
            None => None,
            Some(id) => match self.keys().known_row_id(id) {
                Some(row_id) => Some(row_id),
                None => return Ok(None),
            },
        };
        let Some(model_id) = self.models.known(&event.model) else {
            return Ok(None);
        };
        let upstream_model_id = match event.upstream_model.as_deref() {
            None => None,
            Some(name) => match self.models.known(name) {
                Some(id) => Some(id),
                None => return Ok(None),
            },
        };
        Ok(Some(ValidEvent {
            key_row_id,
            model_id,
            upstream_model_id,
            event: Cow::Borrowed(event),
        }))
    }

    /// Checks an event's fields and resolves its key, writing nothing. The
    /// model ids are left unset (0) for [`Events::resolve_models`].
    fn validate<'e>(&self, event: &'e NewEvent) -> Result<ValidEvent<'e>, Refused> {
        event.validate().map_err(Refused::Field)?;
        let key_row_id =
            match event.key_id {
                None => None,
                Some(id) => Some(self.keys().row_id(id).map_err(Refused::Store)?.ok_or_else(
                    || Refused::Field(Invalid::new("key_id", format!("no key with id {id}"))),
                )?),
            };
        Ok(ValidEvent {
            key_row_id,
            model_id: 0,
            upstream_model_id: None,
            event: Cow::Borrowed(event),
        })
    }

    /// Sets the model ids of a checked event, adding new model names.
    fn resolve_models<'e>(&self, mut valid: ValidEvent<'e>) -> Result<ValidEvent<'e>, Refused> {
        let id = |name: &str| {
            self.models
                .id_or_insert(self.db, name)
                .map_err(Refused::Store)
        };
        valid.model_id = id(&valid.event.model)?;
        valid.upstream_model_id = valid.event.upstream_model.as_deref().map(id).transpose()?;
        Ok(valid)
    }

    fn keys(&self) -> Keys<'a> {
        Keys::new(self.db, self.keys)
    }

    /// The row id of a key named in a query's filter.
    ///
    /// # Errors
    ///
    /// [`Error::KeyNotFound`] if no key has this id, or the store's errors.
    pub(crate) fn key_row_for_query(&self, key: KeyId) -> Result<i64> {
        self.keys()
            .row_id(key)?
            .ok_or(Error::KeyNotFound { id: key })
    }

    /// A filter's key and model as row ids (`None` each when the filter
    /// has none); `None` in all when the model was never recorded, so that
    /// nothing can match.
    ///
    /// # Errors
    ///
    /// [`Error::KeyNotFound`] for an unknown key, or the store's errors.
    pub(crate) fn filter_ids(
        &self,
        key: Option<KeyId>,
        model: Option<&str>,
    ) -> Result<Option<(Option<i64>, Option<i64>)>> {
        let key_row = key.map(|key| self.key_row_for_query(key)).transpose()?;
        let model_id = match model {
            None => None,
            Some(model) => match self.models.existing(self.db, model)? {
                Some(id) => Some(id),
                None => return Ok(None),
            },
        };
        Ok(Some((key_row, model_id)))
    }

    /// Events newest first, filtered, one page at a time.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad page size, [`Error::KeyNotFound`]
    /// for an unknown key, or the store's errors.
    pub fn list(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        let limit = page_size(filter.limit)?;
        let Some((key_row, model_id)) = self.filter_ids(filter.key, filter.model.as_deref())?
        else {
            return Ok(Vec::new());
        };
        let status = match filter.status.map(i32::try_from) {
            None => None,
            Some(Ok(status)) => Some(status),
            Some(Err(_)) => return Ok(Vec::new()),
        };
        self.db.read(|conn| {
            let rows: Vec<Row> = on_backend!(conn, |c| {
                let mut query = events::table
                    .select(events::all_columns)
                    .order((events::ts.desc(), events::id.desc()))
                    .limit(i64::from(limit))
                    .into_boxed();
                if let Some(key_row) = key_row {
                    query = query.filter(events::key_row_id.eq(key_row));
                }
                if let Some(model_id) = model_id {
                    query = query.filter(events::model_id.eq(model_id));
                }
                if let Some(since) = filter.since {
                    query = query.filter(events::ts.ge(since));
                }
                if let Some(until) = filter.until {
                    query = query.filter(events::ts.lt(until));
                }
                if let Some(status) = status {
                    query = query.filter(events::status.eq(status));
                }
                if let Some(cursor) = filter.before {
                    query = query.filter(
                        events::ts
                            .lt(cursor.ts)
                            .or(events::ts.eq(cursor.ts).and(events::id.lt(cursor.id))),
                    );
                }
                query.load(c)
            })?;
            let names = models::names(conn)?;
            let mut key_rows: Vec<i64> = rows.iter().filter_map(|row| row.2).collect();
            key_rows.sort_unstable();
            key_rows.dedup();
            let key_ids = keys::ids_of(conn, &key_rows)?;
            rows.into_iter()
                .map(|row| event_from_row(row, &names, &key_ids))
                .collect()
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
        refuse_zero_batch(batch)?;
        let mut report = PruneReport::default();
        loop {
            let deleted = self.db.write(|conn| delete_before(conn, cutoff, batch))?;
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
        refuse_zero_batch(batch)?;
        let cutoff_hour = cutoff.as_millis().div_euclid(HOUR_MS);
        let mut total = 0u64;
        loop {
            let deleted = self
                .db
                .write(|conn| rollups::delete_before(conn, cutoff_hour, batch))?;
            total += deleted as u64;
            if deleted == 0 {
                return Ok(total);
            }
            std::thread::yield_now();
        }
    }
}

fn refuse_zero_batch(batch: u32) -> Result<()> {
    if batch == 0 {
        return Err(Error::InvalidInput {
            field: "batch",
            reason: "must be at least 1".to_owned(),
        });
    }
    Ok(())
}

/// Deletes at most `batch` raw events older than `cutoff`, inside the
/// caller's write transaction. Returns how many it deleted.
pub(crate) fn delete_before(conn: &mut Conn<'_>, cutoff: Timestamp, batch: u32) -> Result<usize> {
    let delete = CachedSql::new(
        "DELETE FROM events WHERE (ts, id) IN \
         (SELECT ts, id FROM events WHERE ts < ? ORDER BY ts, id LIMIT ?)",
        vec![cutoff.as_millis(), i64::from(batch)],
    );
    Ok(on_backend!(conn, |c| delete.execute(c))?)
}

/// An event row as stored (`events::all_columns`): its key and models by
/// row id.
type Row = (
    EventId,
    Timestamp,
    Option<i64>,
    i64,
    Option<i64>,
    Option<String>,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    Option<String>,
    bool,
    Option<String>,
    Option<i64>,
);

fn event_from_row(
    row: Row,
    names: &HashMap<i64, String>,
    key_ids: &HashMap<i64, KeyId>,
) -> Result<Event> {
    let (
        id,
        ts,
        key_row_id,
        model_id,
        upstream_model_id,
        request_id,
        prompt_tokens,
        completion_tokens,
        cache_read_tokens,
        cache_creation_tokens,
        reasoning_tokens,
        status,
        latency_ms,
        error,
        usage_unknown,
        thinking_level,
        cost_nanos,
    ) = row;
    let missing = |what: String| Error::BadStoredValue {
        message: format!("event {id} refers to {what}, which does not exist"),
    };
    let name = |model: i64| {
        names
            .get(&model)
            .cloned()
            .ok_or_else(|| missing(format!("model id {model}")))
    };
    let key_id = key_row_id
        .map(|key_row| {
            key_ids
                .get(&key_row)
                .copied()
                .ok_or_else(|| missing(format!("key row {key_row}")))
        })
        .transpose()?;
    Ok(Event {
        id,
        cost: cost_nanos.map(Cost),
        event: NewEvent {
            ts,
            key_id,
            model: name(model_id)?,
            upstream_model: upstream_model_id.map(name).transpose()?,
            request_id,
            prompt_tokens: i64::from(prompt_tokens),
            completion_tokens: i64::from(completion_tokens),
            cache_read_tokens: i64::from(cache_read_tokens),
            cache_creation_tokens: i64::from(cache_creation_tokens),
            reasoning_tokens: i64::from(reasoning_tokens),
            status: i64::from(status),
            latency_ms: i64::from(latency_ms),
            error,
            usage_unknown,
            thinking_level,
        },
    })
}
