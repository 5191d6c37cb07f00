//! keytally: the storage layer for an API gateway's keys and usage events, on
//! Diesel and an embedded, bundled SQLite.
//!
//! A gateway opens a [`Store`] at startup, before it binds its listener: the
//! store exists only once its migrations have run, so no request can race the
//! schema. Every connection it hands out has the pragmas applied (WAL,
//! `synchronous`, `foreign_keys`, `busy_timeout`) and the database files are
//! kept at mode 0600. [`Store::close`] checkpoints the write-ahead log so that
//! no `-wal` or `-shm` file is left behind.
//!
//! ```
//! use keytally::{NewEvent, NewKey, Rejection, Store, Timestamp, UsageFilter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let folder = tempfile::tempdir()?;
//! # let path = folder.path().join("keytally.db");
//! // At startup, before the listener binds:
//! let store = Store::open(&path)?;
//!
//! // An operator creates a key; its secret is shown this once.
//! let created = store.keys().create(&NewKey::client("billing service"))?;
//! let secret = created.secret.expose().to_owned();
//!
//! // On every request: resolve the presented secret...
//! let key = match store.keys().resolve(&secret)? {
//!     Ok(key) => key,
//!     Err(Rejection::Malformed | Rejection::Unknown) => return Err("401".into()),
//!     Err(Rejection::Revoked | Rejection::Expired) => return Err("403".into()),
//!     Err(Rejection::OverBudget) => return Err("429".into()),
//! };
//! assert!(key.may_use("gpt-4o"));
//!
//! // ...and record what it cost.
//! let mut event = NewEvent::new(Timestamp::now(), "gpt-4o");
//! event.key_id = Some(key.id);
//! event.prompt_tokens = 1200;
//! event.completion_tokens = 300;
//! event.latency_ms = 840;
//! store.events().record(&event)?;
//!
//! // Dashboards read usage per key, per model, or as a time series.
//! let today = UsageFilter {
//!     key: Some(key.id),
//!     ..UsageFilter::between(Timestamp::now().plus_millis(-86_400_000), Timestamp::now().plus_millis(1))
//! };
//! assert_eq!(store.events().usage(&today)?.prompt_tokens, 1200);
//!
//! // On shutdown, after the listener has stopped:
//! let report = store.close()?;
//! assert!(report.checkpoint_complete);
//! # Ok(())
//! # }
//! ```

// The layers, lowest first; a module imports only from layers below its
// own (checked by tests/it/architecture.rs, see docs/ARCHITECTURE.md).
mod db;
mod error;
mod ingest;
mod model;
mod repositories;
mod sink;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use db::database::{Backend, CloseReport};
#[cfg(feature = "postgres")]
pub use db::postgres::POSTGRES_MIGRATIONS;
pub use db::schema;
pub use db::sqlite::backup::BackupReport;
pub use db::sqlite::check::CheckReport;
pub use db::sqlite::checkpoint::CheckpointReport;
pub use db::sqlite::connection::{Synchronous, DEFAULT_BUSY_TIMEOUT};
pub use db::sqlite::files::{FileInfo, TightenedFile, APPLICATION_ID, DIR_MODE, FILE_MODE};
pub use db::sqlite::location::{default_database_path, DB_FILE_NAME, DB_PATH_ENV};
pub use db::sqlite::migrations::{known_versions, pending_for, MIGRATIONS};
pub use db::sqlite::restore::RestoreReport;
pub use error::{BoxedError, Error, Result};
pub use ingest::{parse_json_line, MAX_JSON_LINE_LEN};
pub use model::budget::{Budget, BudgetPeriod, BudgetStatus, MAX_PERIOD_DAYS};
pub use model::event::{
    Event, EventCursor, EventFilter, EventId, NewEvent, PruneReport, DEFAULT_PRUNE_BATCH,
    DEFAULT_RAW_RETENTION, MAX_BATCH_LEN, MAX_ERROR_TAG_LEN, MAX_REQUEST_ID_LEN,
    MAX_THINKING_LEVEL_LEN,
};
pub use model::invalid::Invalid;
pub use model::key::{
    ActiveKey, AllowedModels, CreatedKey, Key, KeyFilter, KeyId, KeyState, KeyUpdate, NewKey,
    Rejection, Tier, DEFAULT_PAGE_SIZE, DEFAULT_ROTATION_GRACE, MAX_ALLOWED_MODELS,
    MAX_LABEL_CHARS, MAX_MODEL_NAME_CHARS, MAX_PAGE_SIZE,
};
pub use model::location::Location;
pub use model::price::{Cost, Micros, Price, PriceVersion, MAX_PRICE_MICROS};
pub use model::secret::{Secret, DEFAULT_SECRET_PREFIX};
pub use model::time::Timestamp;
pub use model::usage::{Bucket, GroupUsage, Totals, UsageFilter};
pub use repositories::events::Events;
pub use repositories::keys::cache::DEFAULT_KEY_CACHE_SIZE;
pub use repositories::keys::Keys;
pub use repositories::prices::Prices;
pub use sink::{EventSink, SinkOptions, SinkReport, Ticket};
pub use store::options::{
    ResolveMode, Retention, StoreOptions, DEFAULT_LAST_USED_FLUSH_INTERVAL, DEFAULT_POOL_SIZE,
};
#[cfg(feature = "postgres")]
pub use store::postgres::{postgres_schema, PostgresSchema, PostgresStatus};
pub use store::sqlite::{restore, SqlitePooledConnection, Status};
pub use store::Store;
