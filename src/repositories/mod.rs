//! The repositories: typed queries over the tables, one module per table
//! or concern. They run on [`crate::db`]'s connections and transactions and
//! use [`crate::model`]'s values; they never name the store.

pub(crate) mod budgets;
pub(crate) mod event_rows;
pub(crate) mod events;
pub(crate) mod fast_hash;
pub(crate) mod keys;
pub(crate) mod models;
#[cfg(feature = "postgres")]
pub(crate) mod postgres_insert;
pub(crate) mod price_memory;
pub(crate) mod prices;
pub(crate) mod rollups;
pub(crate) mod usage;
