//! What only PostgreSQL has: its connections (the URL kept out of sight)
//! and its migrations, which declare the same tables and columns as
//! SQLite's (`schema.rs`), with identity columns, a sequence for event ids
//! and PL/pgSQL triggers where SQLite has its own.

pub(crate) mod connection;
pub(crate) mod faults;
pub(crate) mod listener;
pub(crate) mod migrations;

pub use migrations::POSTGRES_MIGRATIONS;
