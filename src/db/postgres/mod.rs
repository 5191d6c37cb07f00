//! What only PostgreSQL has. Today: its migrations, which declare the same
//! tables and columns as SQLite's (`schema.rs`), with identity columns, a
//! sequence for event ids and PL/pgSQL triggers where SQLite has its own.

use diesel_migrations::{embed_migrations, EmbeddedMigrations};

/// The PostgreSQL migrations compiled into this binary, from
/// `migrations/postgres/` (`diesel-postgres.toml` points the diesel CLI
/// there).
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
