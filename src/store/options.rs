//! [`StoreOptions`]: how to open a store, and [`Retention`]: how long it
//! keeps what.

use std::path::Path;
use std::time::Duration;

use crate::db::sqlite::connection::{Synchronous, DEFAULT_BUSY_TIMEOUT};
use crate::model::event::DEFAULT_RAW_RETENTION;
use crate::model::location::Location;
use crate::model::secret::DEFAULT_SECRET_PREFIX;
use crate::repositories::keys::cache::DEFAULT_KEY_CACHE_SIZE;

/// The default number of connections in the pool.
pub const DEFAULT_POOL_SIZE: u32 = 8;

/// How to open a [`crate::Store`]: where its database is and the few
/// settings that can change.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub(crate) location: Location,
    pub(crate) synchronous: Synchronous,
    pub(crate) busy_timeout: Duration,
    pub(crate) pool_size: u32,
    pub(crate) secret_prefix: String,
    pub(crate) last_used_flush_interval: Duration,
    pub(crate) retention: Retention,
    pub(crate) key_cache_size: usize,
    pub(crate) resolve_mode: ResolveMode,
    pub(crate) read_only: bool,
}

/// How a resolve answered from memory makes sure that no key or secret has
/// changed since it was read, in any process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResolveMode {
    /// Every resolve asks the database for its count of key changes: one
    /// read, so no resolve that starts after a revoke has committed accepts
    /// the key, in any process or replica. On SQLite the read is local (about
    /// a microsecond); on PostgreSQL it is a round trip to the server. The
    /// default.
    #[default]
    Strict,
    /// A thread of the store keeps the count of key changes, and resolves
    /// answered from memory ask nothing: no read, no pooled connection. A
    /// change made through this store is seen by its next resolve. One made
    /// by another process or replica is seen within the thread's delay: on
    /// PostgreSQL a listener hears it through `LISTEN`/`NOTIFY` (a few
    /// milliseconds) and reads the count every 50 ms; on SQLite a watcher
    /// reads it every 5 ms on a connection of its own. Either way, a count
    /// not read for 100 ms (a lost connection, a locked database) is not
    /// trusted, and resolves ask the database until it is read again. The
    /// trade: a revoke made elsewhere can let a request through for those
    /// few milliseconds.
    Notified,
}

/// How long data is kept, enforced by the store's maintenance thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw events older than this are deleted; `None` keeps them forever.
    /// Default: 60 days.
    pub raw_events: Option<Duration>,
    /// Rollup hours older than this are deleted; `None` (the default) keeps
    /// them forever.
    pub rollups: Option<Duration>,
    /// How often the sweep runs; the first one runs one interval after the
    /// store opens. Default: one hour.
    pub sweep_interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw_events: Some(DEFAULT_RAW_RETENTION),
            rollups: None,
            sweep_interval: Duration::from_secs(3600),
        }
    }
}

/// The default interval at which noted `last_used_at` times are written.
pub const DEFAULT_LAST_USED_FLUSH_INTERVAL: Duration = Duration::from_secs(30);

impl StoreOptions {
    /// Options for the database at `location`, with the defaults:
    /// synchronous `NORMAL`, a 5 s busy timeout, 8 pooled connections.
    ///
    /// `location` is read as [`Location::parse`] reads it: a
    /// `postgres://` or `postgresql://` URL names a PostgreSQL database
    /// (with the `postgres` feature), `sqlite://PATH` or any other text the
    /// path of an SQLite file.
    pub fn new(location: impl AsRef<Path>) -> Self {
        StoreOptions {
            location: Location::parse(location),
            synchronous: Synchronous::Normal,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            secret_prefix: DEFAULT_SECRET_PREFIX.to_owned(),
            last_used_flush_interval: DEFAULT_LAST_USED_FLUSH_INTERVAL,
            retention: Retention::default(),
            key_cache_size: DEFAULT_KEY_CACHE_SIZE,
            resolve_mode: ResolveMode::Strict,
            read_only: false,
        }
    }

    /// Sets how long raw events and rollups are kept (default: raw events 60
    /// days, rollups forever, swept hourly). A zero duration means forever.
    #[must_use]
    pub fn retention(mut self, retention: Retention) -> Self {
        let forever_if_zero = |d: Option<Duration>| d.filter(|d| !d.is_zero());
        self.retention = Retention {
            raw_events: forever_if_zero(retention.raw_events),
            rollups: forever_if_zero(retention.rollups),
            sweep_interval: retention.sweep_interval.max(Duration::from_millis(10)),
        };
        self
    }

    /// Sets the prefix of new secrets (default `kt_`): 1 to 16 ASCII
    /// letters, digits or underscores. Secrets are only accepted with the
    /// prefix the store was opened with.
    #[must_use]
    pub fn secret_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.secret_prefix = prefix.into();
        self
    }

    /// Sets how often `last_used_at` times noted by resolves are written
    /// (default 30 s, so they are never more than a minute behind).
    #[must_use]
    pub fn last_used_flush_interval(mut self, interval: Duration) -> Self {
        self.last_used_flush_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Sets how many resolved secrets are kept in memory (default 65,536;
    /// up to twice as many are held). A kept answer is used only while no
    /// key or secret has changed in the database since it was read, by any
    /// process; 0 reads the database on every resolve.
    #[must_use]
    pub fn key_cache_size(mut self, entries: usize) -> Self {
        self.key_cache_size = entries;
        self
    }

    /// Sets how resolves answered from memory confirm that nothing
    /// changed (default [`ResolveMode::Strict`]).
    #[must_use]
    pub fn resolve_mode(mut self, mode: ResolveMode) -> Self {
        self.resolve_mode = mode;
        self
    }

    /// The same options for another SQLite database.
    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        self.location = Location::Sqlite(path.to_path_buf());
        self
    }

    /// Where the database is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Sets `PRAGMA synchronous` for every connection (SQLite only: on
    /// PostgreSQL a commit is durable as the server's `synchronous_commit`
    /// says).
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets how long a connection waits for a lock before
    /// [`crate::Error::Busy`] (on PostgreSQL, the `lock_timeout` of every
    /// connection).
    #[must_use]
    pub fn busy_timeout(mut self, busy_timeout: Duration) -> Self {
        self.busy_timeout = busy_timeout;
        self
    }

    /// Sets the largest number of pooled connections (at least 1).
    #[must_use]
    pub fn pool_size(mut self, pool_size: u32) -> Self {
        self.pool_size = pool_size.max(1);
        self
    }

    /// Opens the SQLite database for reading only (default: off): nothing
    /// is created, migrated, checkpointed or chmod-ed, and no write is
    /// possible, so reading works on a read-only filesystem and on a full
    /// disk. A database whose log is absent or empty and whose `-shm`
    /// cannot be made or used is opened immutable (no locks: only safe
    /// while nothing writes it). Opening fails with [`crate::Error::NeedsMigration`] if
    /// the schema is not current. SQLite only.
    #[must_use]
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }
}
