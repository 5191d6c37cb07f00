//! The `models` table: every model name stored once, events referring to it
//! by id. Names are never deleted, so their ids are kept in memory once
//! known.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use diesel::prelude::*;

use crate::db::database::{on_backend, Conn, Database};
use crate::db::schema::models;
use crate::error::Result;
use crate::repositories::price_memory::PriceMemory;

/// Model names to their ids, as far as this store has seen them, and the
/// models' prices as SQLite's recording transactions read them.
#[derive(Debug, Default)]
pub(crate) struct ModelIds {
    ids: RwLock<HashMap<String, i64>>,
    pub(crate) prices: PriceMemory,
}

impl ModelIds {
    /// The id of a model name, from memory, the database, or a new row. A
    /// new model is committed on its own: a model row nothing refers to is
    /// harmless, and memory only ever holds committed ids.
    pub(crate) fn id_or_insert(&self, db: &Database, name: &str) -> Result<i64> {
        if let Some(id) = self.known(name) {
            return Ok(id);
        }
        let id = db.write(|conn| {
            Ok(on_backend!(conn, |c| {
                diesel::insert_into(models::table)
                    .values(models::name.eq(name))
                    .on_conflict_do_nothing()
                    .execute(c)?;
                models::table
                    .filter(models::name.eq(name))
                    .select(models::id)
                    .get_result::<i64>(c)
            })?)
        })?;
        self.remember(name, id);
        Ok(id)
    }

    /// The id of a model that exists, without creating it.
    pub(crate) fn existing(&self, db: &Database, name: &str) -> Result<Option<i64>> {
        if let Some(id) = self.known(name) {
            return Ok(Some(id));
        }
        let mut pooled = db.connection()?;
        let id = on_backend!(&mut pooled.conn(), |c| models::table
            .filter(models::name.eq(name))
            .select(models::id)
            .get_result(c)
            .optional())?;
        if let Some(id) = id {
            self.remember(name, id);
        }
        Ok(id)
    }

    /// The id of a model seen before by this store, from memory.
    pub(crate) fn known(&self, name: &str) -> Option<i64> {
        self.ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
    }

    fn remember(&self, name: &str, id: i64) {
        self.ids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), id);
    }
}

/// Every model's name by id (the table is small: one row per model name).
pub(crate) fn names(conn: &mut Conn<'_>) -> Result<HashMap<i64, String>> {
    Ok(on_backend!(conn, |c| models::table
        .select((models::id, models::name))
        .load::<(i64, String)>(c))?
    .into_iter()
    .collect())
}
