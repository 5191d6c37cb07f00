//! [`Store`]: an opened, migrated keytally database and its connection pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduled_thread_pool::ScheduledThreadPool;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use serde::Serialize;

use crate::connection::{pragma_integer, ConnectionSetup, Synchronous};
use crate::error::{Error, Result};
use crate::files::{self, FileInfo, TightenedFile};
use crate::migrations;

/// A connection checked out of the store's pool. It goes back to the pool
/// when dropped.
pub type PooledConn = PooledConnection<ConnectionManager<SqliteConnection>>;

/// The default time a connection waits for another one's write lock before
/// giving up with [`Error::Busy`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The default number of connections in the pool.
pub const DEFAULT_POOL_SIZE: u32 = 8;

/// How to open a [`Store`]: the path and the few settings that can change.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    path: PathBuf,
    synchronous: Synchronous,
    busy_timeout: Duration,
    pool_size: u32,
}

impl StoreOptions {
    /// Options for the database at `path`, with the defaults: synchronous
    /// `NORMAL`, a 5 s busy timeout, 8 pooled connections.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreOptions {
            path: path.into(),
            synchronous: Synchronous::Normal,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
        }
    }

    /// Sets `PRAGMA synchronous` for every connection.
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets how long a connection waits for a lock before [`Error::Busy`].
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

    /// Opens the store; see [`Store::open`].
    ///
    /// # Errors
    ///
    /// As [`Store::open`].
    pub fn open(&self) -> Result<Store> {
        Store::open_with(self)
    }
}

/// An open keytally database whose migrations have all run.
///
/// A `Store` exists only once its schema is current, so nothing can read or
/// write through it before the migrations are done. Every connection it hands
/// out has had the permissions checked and the pragmas applied. Share it
/// between threads behind an `Arc`; call [`Store::close`] on shutdown.
pub struct Store {
    setup: ConnectionSetup,
    pool: Pool<ConnectionManager<SqliteConnection>>,
    /// The pool's worker threads. The pool's shared state holds the only
    /// other reference, so once this is the last one every pooled connection
    /// has been closed: [`Store::close`] waits for that.
    pool_threads: Arc<ScheduledThreadPool>,
    applied_at_open: Vec<String>,
    tightened_at_open: Vec<TightenedFile>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.setup.path)
            .field("synchronous", &self.setup.synchronous)
            .finish_non_exhaustive()
    }
}

/// What `keytally status` shows about a store.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The database file.
    pub path: PathBuf,
    /// The version of the bundled SQLite library.
    pub sqlite_version: String,
    /// `PRAGMA journal_mode`: always `wal` for an open store.
    pub journal_mode: String,
    /// `PRAGMA synchronous`, by name (`normal` or `full`).
    pub synchronous: String,
    /// `PRAGMA foreign_keys`.
    pub foreign_keys: bool,
    /// `PRAGMA application_id`, keytally's mark.
    pub application_id: u32,
    /// `PRAGMA user_version`: the number of applied migrations.
    pub user_version: i64,
    /// The version of the newest applied migration.
    pub schema_version: Option<String>,
    /// Known migrations not applied yet (empty for an open store).
    pub pending_migrations: Vec<String>,
    /// The database file and its sidecars, with modes and sizes.
    pub files: Vec<FileInfo>,
}

/// What [`Store::close`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[must_use = "the report says whether the final checkpoint completed"]
pub struct CloseReport {
    /// Whether `PRAGMA wal_checkpoint(TRUNCATE)` copied the whole log into
    /// the database and emptied it. `false` means another connection (in
    /// this or another process) kept it from completing; nothing is lost, the
    /// log is checkpointed later by the next writer or the last to close.
    pub checkpoint_complete: bool,
    /// Frames that were in the write-ahead log when the checkpoint ran.
    pub log_frames: i64,
    /// Frames copied into the database by the checkpoint.
    pub checkpointed_frames: i64,
    /// Pooled connections still checked out when the wait for them ended.
    pub connections_still_out: u32,
    /// Whether the `-wal` and `-shm` files are gone or empty after closing.
    pub sidecars_gone: bool,
}

#[derive(QueryableByName)]
struct CheckpointRow {
    #[diesel(sql_type = BigInt)]
    busy: i64,
    #[diesel(sql_type = BigInt)]
    log: i64,
    #[diesel(sql_type = BigInt)]
    checkpointed: i64,
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    value: String,
}

impl Store {
    /// Opens (creating if needed) the database at `path` with the default
    /// options, and applies pending migrations before returning.
    ///
    /// # Errors
    ///
    /// - [`Error::Symlink`] if the path (or a sidecar) is a symbolic link.
    /// - [`Error::NotADatabase`], [`Error::Corrupt`], [`Error::Foreign`] or
    ///   [`Error::SchemaTooNew`] if the file is not one this binary can use;
    ///   the file is then left unchanged.
    /// - [`Error::WalUnsupported`] if the filesystem cannot do WAL.
    /// - [`Error::Permission`], [`Error::Io`], [`Error::Open`] for file
    ///   system trouble, [`Error::Migration`] if a migration fails (it is
    ///   rolled back), [`Error::Busy`] if another process holds the write lock
    ///   for longer than the busy timeout.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        StoreOptions::new(path.as_ref()).open()
    }

    /// Opens the store with `options`; see [`Store::open`].
    ///
    /// # Errors
    ///
    /// As [`Store::open`].
    pub fn open_with(options: &StoreOptions) -> Result<Store> {
        let path = options.path.clone();
        files::prepare_database_path(&path)?;
        // Refuse what is not ours before SQLite (or a chmod) touches it.
        files::inspect_header(&path)?;
        let tightened_at_open = files::tighten_modes(&path)?;
        let setup = ConnectionSetup {
            path: path.clone(),
            synchronous: options.synchronous,
            busy_timeout: options.busy_timeout,
        };
        let mut first = setup
            .establish()
            .map_err(|e| classify_open_error(e, &path))?;
        let applied_at_open = migrations::run_pending(&mut first, &path)
            .map_err(|e| classify_open_error(e, &path))?;
        let path_str = path.to_str().ok_or_else(|| Error::Open {
            path: path.clone(),
            message: "the path is not valid UTF-8".to_owned(),
        })?;
        let pool_threads = Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(1)
                .thread_name_pattern("keytally-pool-{}")
                .build(),
        );
        let pool = Pool::builder()
            .thread_pool(Arc::clone(&pool_threads))
            .max_size(options.pool_size)
            .min_idle(Some(1))
            // A checked-out connection is used at once; a broken one shows
            // its error there. Testing each checkout would cost a query on
            // every request.
            .test_on_check_out(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connection_timeout(options.busy_timeout.max(Duration::from_secs(1)))
            .connection_customizer(Box::new(setup.clone()))
            .build_unchecked(ConnectionManager::new(path_str));
        // Hand the first connection's place to the pool only once the pool
        // holds one, so the write-ahead log is not closed and reopened.
        drop(pool.get()?);
        drop(first);
        Ok(Store {
            setup,
            pool,
            pool_threads,
            applied_at_open,
            tightened_at_open,
        })
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        self.setup.database_path()
    }

    /// Full names of the migrations this open applied (empty when the
    /// schema was already current).
    pub fn applied_at_open(&self) -> &[String] {
        &self.applied_at_open
    }

    /// The files whose modes were wider than 0600 when the store opened, and
    /// were tightened (each was also logged as a warning).
    pub fn tightened_at_open(&self) -> &[TightenedFile] {
        &self.tightened_at_open
    }

    /// Checks a connection out of the pool.
    ///
    /// # Errors
    ///
    /// [`Error::Pool`] if none became free within the busy timeout, or a new
    /// one could not be opened.
    pub fn connection(&self) -> Result<PooledConn> {
        Ok(self.pool.get()?)
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`): it takes the
    /// write lock up front, waiting up to the busy timeout, so it never fails
    /// half-way with "database is locked". Commits if `f` returns `Ok`, rolls
    /// back otherwise.
    ///
    /// # Errors
    ///
    /// What `f` returns, [`Error::Busy`] if the lock stayed taken, or
    /// [`Error::Pool`].
    pub fn write<T>(&self, f: impl FnOnce(&mut SqliteConnection) -> Result<T>) -> Result<T> {
        let mut conn = self.connection()?;
        (*conn).immediate_transaction(f)
    }

    /// Runs `f` in a read transaction, which sees one consistent snapshot.
    ///
    /// # Errors
    ///
    /// What `f` returns, or [`Error::Pool`].
    pub fn read<T>(&self, f: impl FnOnce(&mut SqliteConnection) -> Result<T>) -> Result<T> {
        let mut conn = self.connection()?;
        (*conn).transaction(f)
    }

    /// Reports the database's settings, schema version and files.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::Io`] or [`Error::Pool`].
    pub fn status(&self) -> Result<Status> {
        let mut conn = self.connection()?;
        let conn = &mut *conn;
        let sqlite_version = diesel::sql_query("SELECT sqlite_version() AS value")
            .get_result::<TextRow>(conn)?
            .value;
        let journal_mode =
            diesel::sql_query("SELECT journal_mode AS value FROM pragma_journal_mode")
                .get_result::<TextRow>(conn)?
                .value;
        let synchronous = Synchronous::name_of(pragma_integer(conn, "synchronous")?).to_owned();
        let foreign_keys = pragma_integer(conn, "foreign_keys")? == 1;
        let application_id = pragma_integer(conn, "application_id")? as u32;
        let user_version = pragma_integer(conn, "user_version")?;
        let schema = migrations::inspect_read_only(conn, self.path())?;
        Ok(Status {
            path: self.path().to_path_buf(),
            sqlite_version,
            journal_mode,
            synchronous,
            foreign_keys,
            application_id,
            user_version,
            schema_version: schema.applied.last().cloned(),
            pending_migrations: schema.pending,
            files: files::file_infos(self.path())?,
        })
    }

    /// Closes the store: stops handing out connections, waits (up to the
    /// busy timeout) for checked-out ones to come back, closes the pool, then
    /// runs `PRAGMA wal_checkpoint(TRUNCATE)` on the last connection and
    /// closes it, which removes `-wal` and `-shm`.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] or [`Error::Database`] if the final connection cannot
    /// be opened or the checkpoint cannot run. A checkpoint that runs but
    /// cannot complete is not an error: the report says so.
    pub fn close(self) -> Result<CloseReport> {
        let Store {
            setup,
            pool,
            pool_threads,
            ..
        } = self;
        let deadline = Instant::now() + setup.busy_timeout;
        let connections_still_out = loop {
            let state = pool.state();
            let out = state.connections - state.idle_connections;
            if out == 0 || Instant::now() >= deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if connections_still_out > 0 {
            tracing::warn!(
                connections = connections_still_out,
                "closing the store while connections are still checked out"
            );
        }
        drop(pool);
        // A connection being opened in the background, or one still checked
        // out, keeps the pool's state alive; the final checkpoint waits for
        // them (within the deadline) so that it is the last connection.
        while Arc::strong_count(&pool_threads) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut conn = setup.establish()?;
        // Keeps the query planner's statistics current, as SQLite advises on
        // closing; before the checkpoint, so anything it writes is included.
        conn.batch_execute("PRAGMA optimize")?;
        let row: CheckpointRow =
            diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)").get_result(&mut conn)?;
        let checkpoint_complete = row.busy == 0 && row.log == row.checkpointed;
        // The checkpoint has emptied the log: closing the last connection
        // removes the sidecar files without any further work.
        drop(conn);
        let sidecars_gone = files::SIDECAR_SUFFIXES.iter().all(|suffix| {
            std::fs::metadata(files::sidecar(&setup.path, suffix))
                .map(|metadata| metadata.len() == 0)
                .unwrap_or(true)
        });
        if !checkpoint_complete {
            tracing::warn!(
                log_frames = row.log,
                checkpointed_frames = row.checkpointed,
                "final checkpoint did not complete; another connection is still using the database"
            );
        }
        Ok(CloseReport {
            checkpoint_complete,
            log_frames: row.log,
            checkpointed_frames: row.checkpointed,
            connections_still_out,
            sidecars_gone,
        })
    }
}

/// Gives SQLite's "not a database" and "malformed" errors met while opening
/// their typed variants, naming the file.
fn classify_open_error(error: Error, path: &Path) -> Error {
    let message = match &error {
        Error::Database(diesel::result::Error::DatabaseError(_, info)) => info.message(),
        Error::Open { message, .. } => message.as_str(),
        _ => return error,
    };
    if message.starts_with("file is not a database") {
        Error::NotADatabase {
            path: path.to_path_buf(),
        }
    } else if message.starts_with("database disk image is malformed") {
        Error::Corrupt {
            path: path.to_path_buf(),
            detail: message.to_owned(),
        }
    } else {
        error
    }
}
