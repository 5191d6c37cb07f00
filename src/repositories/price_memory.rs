//! The prices a recording transaction on SQLite costs its events with, kept
//! in memory while the database's count of price changes (`sequences`,
//! name `price_changes`, moved by triggers on `prices`) stays the one they
//! were loaded at. See `prices` for why a cost always matches the table.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use diesel::prelude::*;

use crate::db::schema::prices;
use crate::error::Result;
use crate::model::event::NewEvent;
use crate::model::price::{Cost, Price};

/// The columns of a price version: when it takes effect, then its five
/// prices; read into a [`VersionRow`].
pub(crate) const VERSION_COLUMNS: (
    prices::effective_from,
    prices::prompt_micros,
    prices::completion_micros,
    prices::cache_read_micros,
    prices::cache_creation_micros,
    prices::reasoning_micros,
) = (
    prices::effective_from,
    prices::prompt_micros,
    prices::completion_micros,
    prices::cache_read_micros,
    prices::cache_creation_micros,
    prices::reasoning_micros,
);

/// A row of [`VERSION_COLUMNS`].
pub(crate) type VersionRow = (i64, i64, i64, i64, i64, i64);

/// A price version's time and price, from its row.
pub(crate) fn version_of((from, a, b, c, d, e): VersionRow) -> (i64, Price) {
    (from, Price::from_micros([a, b, c, d, e]))
}

/// The prices as a recording transaction on SQLite costs events with:
/// loaded in such a transaction, and kept while the count of price changes
/// it reads stays the one they were loaded at.
#[derive(Debug, Default)]
pub(crate) struct PriceMemory {
    table: Mutex<Option<PriceTable>>,
}

#[derive(Debug)]
struct PriceTable {
    /// The count of price changes it was loaded at.
    changes: i64,
    /// Each model's versions, oldest first.
    by_model: HashMap<i64, Vec<(i64, Price)>>,
}

impl PriceTable {
    fn in_force(&self, model_id: i64, at: i64) -> Option<&Price> {
        let versions = self.by_model.get(&model_id)?;
        let after = versions.partition_point(|(from, _)| *from <= at);
        versions.get(after.checked_sub(1)?).map(|(_, price)| price)
    }
}

impl PriceMemory {
    /// The cost of each event (given with its model's id) at the price in
    /// force at its time (`None` without one), inside the caller's write
    /// transaction, which read `changes` from `sequences`.
    pub(crate) fn costs<'e>(
        &self,
        conn: &mut diesel::SqliteConnection,
        changes: i64,
        events: impl ExactSizeIterator<Item = (i64, &'e NewEvent)>,
    ) -> Result<Vec<Option<Cost>>> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if table.as_ref().map(|table| table.changes) != Some(changes) {
            let rows: Vec<(i64, VersionRow)> = prices::table
                .select((prices::model_id, VERSION_COLUMNS))
                .order((prices::model_id, prices::effective_from))
                .load(conn)?;
            let mut by_model: HashMap<i64, Vec<(i64, Price)>> = HashMap::new();
            for (model_id, row) in rows {
                by_model.entry(model_id).or_default().push(version_of(row));
            }
            *table = Some(PriceTable { changes, by_model });
        }
        let Some(table) = table.as_ref() else {
            return Ok(vec![None; events.len()]);
        };
        Ok(events
            .map(|(model_id, event)| {
                table
                    .in_force(model_id, event.ts.as_millis())
                    .map(|price| price.cost_of(event.token_counts()))
            })
            .collect())
    }
}
