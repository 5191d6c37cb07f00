//! The prices repository: the `prices` table and [`Prices`] (set, list),
//! and the prices a recording transaction costs its events with.
//!
//! An event's cost is fixed when it is recorded, with the price in force at
//! its time, and kept in the event's row and the rollups. So that a cost
//! never disagrees with the price table, a price may not take effect before
//! an event of its model that is already recorded: [`Prices::set`] checks
//! that in its write transaction, which on PostgreSQL also holds recorders
//! off `events` (`SHARE` lock) until it commits. PostgreSQL's recording
//! statement reads the prices itself; on SQLite the recording transaction
//! compares the count of price changes (`sequences`, name `price_changes`,
//! moved by triggers) with the one its `PriceMemory` was loaded at.

use diesel::prelude::*;
use diesel::sql_types::Bool;

use crate::db::database::{on_backend, Conn, Database};
use crate::db::schema::{models, prices};
use crate::db::sql::CachedSql;
use crate::error::{Error, Result};
use crate::model::price::PriceVersion;
use crate::model::time::{Timestamp, HOUR_MS};
use crate::repositories::models::ModelIds;
use crate::repositories::price_memory::{version_of, VersionRow, VERSION_COLUMNS};

/// The prices repository of a store; see `Store::prices`.
#[derive(Debug, Clone, Copy)]
pub struct Prices<'a> {
    db: &'a Database,
    models: &'a ModelIds,
}

impl<'a> Prices<'a> {
    pub(crate) fn new(db: &'a Database, models: &'a ModelIds) -> Prices<'a> {
        Prices { db, models }
    }

    /// Sets a model's price from a time on (until its next version),
    /// replacing a version from the same time. Events recorded from then on
    /// are costed at it.
    ///
    /// # Errors
    ///
    /// As [`Prices::set_all`].
    pub fn set(&self, version: &PriceVersion) -> Result<()> {
        self.set_all(std::slice::from_ref(version))
    }

    /// Sets several prices in one transaction: all or none.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a price out of range, a bad model name,
    /// or a time at or before which an event of the model is already
    /// recorded (its cost would no longer match the table), naming the
    /// model; or the store's errors. No price is written on error.
    pub fn set_all(&self, versions: &[PriceVersion]) -> Result<()> {
        let mut rows = Vec::with_capacity(versions.len());
        for version in versions {
            version.price.validate()?;
            crate::model::key::validate_model_name(&version.model).map_err(|reason| {
                Error::InvalidInput {
                    field: "model",
                    reason,
                }
            })?;
        }
        for version in versions {
            let model_id = self.models.id_or_insert(self.db, &version.model)?;
            rows.push((model_id, version));
        }
        self.db.write(|conn| {
            // The check below sees every event.
            conn.hold_off_recorders()?;
            for &(model_id, version) in &rows {
                let from = version.effective_from.as_millis();
                if recorded_since(conn, model_id, from)? {
                    return Err(Error::InvalidInput {
                        field: "effective_from",
                        reason: format!(
                            "events of {} are already recorded at or after {}: a price \
                             cannot change what recorded events cost; give a later time",
                            version.model, version.effective_from
                        ),
                    });
                }
                let [prompt, completion, cache_read, cache_creation, reasoning] =
                    version.price.micros();
                on_backend!(conn, |c| diesel::insert_into(prices::table)
                    .values((
                        prices::model_id.eq(model_id),
                        prices::effective_from.eq(from),
                        prices::prompt_micros.eq(prompt),
                        prices::completion_micros.eq(completion),
                        prices::cache_read_micros.eq(cache_read),
                        prices::cache_creation_micros.eq(cache_creation),
                        prices::reasoning_micros.eq(reasoning),
                    ))
                    .on_conflict((prices::model_id, prices::effective_from))
                    .do_update()
                    .set((
                        prices::prompt_micros.eq(prompt),
                        prices::completion_micros.eq(completion),
                        prices::cache_read_micros.eq(cache_read),
                        prices::cache_creation_micros.eq(cache_creation),
                        prices::reasoning_micros.eq(reasoning),
                    ))
                    .execute(c))?;
            }
            Ok(())
        })?;
        for version in versions {
            tracing::info!(model = %version.model, effective_from = %version.effective_from, "price set");
        }
        Ok(())
    }

    /// Every price version, by model name and then time.
    ///
    /// # Errors
    ///
    /// The store's errors.
    pub fn list(&self) -> Result<Vec<PriceVersion>> {
        let rows: Vec<(String, VersionRow)> = self.db.read(|conn| {
            Ok(on_backend!(conn, |c| prices::table
                .inner_join(models::table)
                .select((models::name, VERSION_COLUMNS))
                .order((models::name, prices::effective_from))
                .load(c))?)
        })?;
        Ok(rows
            .into_iter()
            .map(|(model, row)| {
                let (from, price) = version_of(row);
                PriceVersion {
                    model,
                    effective_from: Timestamp::from_stored(from),
                    price,
                }
            })
            .collect())
    }
}

/// Whether an event of `model_id` is recorded at or after `from`: in the
/// rollups for the hours after `from`'s, in the raw events for the rest of
/// its hour.
fn recorded_since(conn: &mut Conn<'_>, model_id: i64, from: i64) -> Result<bool> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = Bool)]
        found: bool,
    }
    let hour = from.div_euclid(HOUR_MS);
    let query = CachedSql::new(
        "SELECT (EXISTS (SELECT 1 FROM usage_model_hourly WHERE hour > ? AND model_id = ?) \
         OR EXISTS (SELECT 1 FROM events WHERE ts >= ? AND ts < ? AND model_id = ?)) AS found",
        vec![hour, model_id, from, (hour + 1) * HOUR_MS, model_id],
    );
    let found: Found = on_backend!(conn, |c| query.get_result(c))?;
    Ok(found.found)
}
