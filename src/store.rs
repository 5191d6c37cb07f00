//! [`Store`]: an opened, migrated keytally database and its connection pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use scheduled_thread_pool::ScheduledThreadPool;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use serde::Serialize;

use crate::connection::{pragma_integer, ConnectionSetup, Synchronous};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::files::{self, FileInfo, TightenedFile};
use crate::key_cache::KeyCache;
use crate::keys::{self, KeyId, Keys};
use crate::migrations;
use crate::secret;

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
    secret_prefix: String,
    last_used_flush_interval: Duration,
    retention: Retention,
    key_cache_size: usize,
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
            raw_events: Some(crate::events::DEFAULT_RAW_RETENTION),
            rollups: None,
            sweep_interval: Duration::from_secs(3600),
        }
    }
}

/// The default interval at which noted `last_used_at` times are written.
pub const DEFAULT_LAST_USED_FLUSH_INTERVAL: Duration = Duration::from_secs(30);

impl StoreOptions {
    /// Options for the database at `path`, with the defaults: synchronous
    /// `NORMAL`, a 5 s busy timeout, 8 pooled connections.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreOptions {
            path: path.into(),
            synchronous: Synchronous::Normal,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            secret_prefix: crate::secret::DEFAULT_SECRET_PREFIX.to_owned(),
            last_used_flush_interval: DEFAULT_LAST_USED_FLUSH_INTERVAL,
            retention: Retention::default(),
            key_cache_size: crate::key_cache::DEFAULT_KEY_CACHE_SIZE,
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

    /// The same options for another database path.
    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        self.path = path.to_path_buf();
        self
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.path
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
    /// `None` once the store is closed.
    pool: Option<Pool<ConnectionManager<SqliteConnection>>>,
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
    secret_prefix: String,
    /// The pool's worker threads. The pool's shared state holds the only
    /// other reference, so once this is the last one every pooled connection
    /// has been closed: [`Store::close`] waits for that.
    pool_threads: Arc<ScheduledThreadPool>,
    applied_at_open: Vec<String>,
    tightened_at_open: Vec<TightenedFile>,
    /// Recently resolved secrets; see [`crate::key_cache`].
    key_cache: KeyCache<keys::Resolved>,
    /// Declared last, so dropped after the pool: while it lives, nothing in
    /// this process opens the database file with plain I/O.
    _claim: files::OpenClaim,
}

/// Hashes the keys of the store's in-memory maps: key row ids, key ids and
/// secret hashes, looked up on every resolve or recorded event. Their values
/// are chosen by SQLite or by keytally (row ids, random UUIDs, SHA-256 of
/// stored secrets), never by a caller, and a caller's look-up never inserts,
/// so a multiplicative hash serves where SipHash's resistance to chosen keys
/// would only cost time.
#[derive(Default, Clone, Copy)]
pub(crate) struct BuildFastHasher;

#[derive(Default)]
pub(crate) struct FastHasher(u64);

impl std::hash::BuildHasher for BuildFastHasher {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(word);
            self.write_u64(u64::from_le_bytes(buf));
        }
        for &byte in words.remainder() {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }

    fn write_i64(&mut self, value: i64) {
        self.write_u64(value as u64);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// State shared between the store and its `last_used_at` flusher thread,
/// plus caches of values that never change once written.
#[derive(Default)]
pub(crate) struct Shared {
    /// `last_used_at` times noted by resolves and not written yet, by key
    /// row id, in Unix milliseconds.
    last_used: Mutex<HashMap<i64, i64, BuildFastHasher>>,
    /// Set to stop the flusher.
    stopping: Mutex<bool>,
    wake_flusher: Condvar,
    /// Key ids to their row ids. Keys are never deleted, so entries never
    /// go stale.
    pub(crate) key_rows: RwLock<HashMap<KeyId, i64, BuildFastHasher>>,
    /// Model names to their ids. Models are never deleted.
    pub(crate) model_ids: RwLock<HashMap<String, i64>>,
    /// Taken by every writer of this store before `BEGIN IMMEDIATE`.
    write_gate: Mutex<()>,
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
        secret::validate_prefix(&options.secret_prefix)?;
        let path = options.path.clone();
        files::prepare_database_path(&path)?;
        // Refuse what is not ours before SQLite (or a chmod) touches it.
        let claim = files::claim_for_store(&path)?;
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
        let shared = Arc::new(Shared::default());
        let flusher = spawn_maintenance(
            pool.clone(),
            Arc::clone(&shared),
            options.last_used_flush_interval,
            options.retention,
        )?;
        Ok(Store {
            setup,
            pool: Some(pool),
            shared,
            flusher: Some(flusher),
            secret_prefix: options.secret_prefix.clone(),
            pool_threads,
            applied_at_open,
            tightened_at_open,
            key_cache: KeyCache::new(options.key_cache_size),
            _claim: claim,
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
        Ok(self.pool.as_ref().ok_or(Error::Closed)?.get()?)
    }

    /// The keys repository: create, resolve, revoke, rotate, update, list.
    pub fn keys(&self) -> Keys<'_> {
        Keys::new(self)
    }

    /// The events repository: record, batch, list, prune.
    pub fn events(&self) -> Events<'_> {
        Events::new(self)
    }

    pub(crate) fn secret_prefix(&self) -> &str {
        &self.secret_prefix
    }

    pub(crate) fn key_cache(&self) -> &KeyCache<keys::Resolved> {
        &self.key_cache
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Notes that a key was just used; written by the flusher.
    pub(crate) fn note_key_used(&self, row_id: i64, now: crate::Timestamp) {
        let mut noted = self
            .shared
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        noted.insert(row_id, now.as_millis());
    }

    pub(crate) fn flush_last_used(&self) -> Result<usize> {
        let pool = self.pool.as_ref().ok_or(Error::Closed)?;
        flush_last_used(pool, &self.shared)
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`): it takes the
    /// write lock up front, waiting up to the busy timeout, so it never fails
    /// half-way with "database is locked". Commits if `f` returns `Ok`, rolls
    /// back otherwise. Writers of one store queue in this process before
    /// they ask SQLite for the lock; `f` must not call `write` again.
    ///
    /// # Errors
    ///
    /// What `f` returns, [`Error::Busy`] if the lock stayed taken, or
    /// [`Error::Pool`].
    pub fn write<T>(&self, f: impl FnOnce(&mut SqliteConnection) -> Result<T>) -> Result<T> {
        let mut conn = self.connection()?;
        write_with(&self.shared, &mut conn, f)
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

    /// Copies the write-ahead log into the database file (a passive
    /// checkpoint, which blocks nobody) and empties it if no reader still
    /// needs it (`wal_checkpoint(TRUNCATE)`, without waiting: while it waits
    /// it would block every writer).
    ///
    /// # Errors
    ///
    /// [`Error::Pool`] or [`Error::Database`]. A checkpoint that runs but
    /// cannot complete is not an error: the report says so.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        let mut conn = self.connection()?;
        checkpoint_truncate(&mut conn, self.setup.busy_timeout, Duration::ZERO)
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
    pub fn close(mut self) -> Result<CloseReport> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<CloseReport> {
        let Some(pool) = self.pool.take() else {
            return Err(Error::Closed);
        };
        // The flusher writes what resolves noted, one last time, and stops.
        *self
            .shared
            .stopping
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake_flusher.notify_all();
        if let Some(flusher) = self.flusher.take() {
            if flusher.join().is_err() {
                tracing::warn!("the last_used_at flusher thread panicked");
            }
        }
        let setup = &self.setup;
        let pool_threads = &self.pool_threads;
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
        while Arc::strong_count(pool_threads) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut conn = setup.establish()?;
        // Keeps the query planner's statistics current, as SQLite advises on
        // closing; before the checkpoint, so anything it writes is included.
        conn.batch_execute("PRAGMA optimize")?;
        // Nothing else of this process uses the database any more; another
        // process may be between two statements, so wait a little for it.
        let checkpoint = checkpoint_truncate(&mut conn, setup.busy_timeout, setup.busy_timeout)?;
        // The checkpoint has emptied the log: closing the last connection
        // removes the sidecar files without any further work.
        drop(conn);
        let sidecars_gone = files::SIDECAR_SUFFIXES.iter().all(|suffix| {
            std::fs::metadata(files::sidecar(&setup.path, suffix))
                .map(|metadata| metadata.len() == 0)
                .unwrap_or(true)
        });
        if !checkpoint.complete {
            tracing::warn!(
                log_frames = checkpoint.log_frames,
                checkpointed_frames = checkpoint.checkpointed_frames,
                "final checkpoint did not complete; another connection is still using the database"
            );
        }
        Ok(CloseReport {
            checkpoint_complete: checkpoint.complete,
            log_frames: checkpoint.log_frames,
            checkpointed_frames: checkpoint.checkpointed_frames,
            connections_still_out,
            sidecars_gone,
        })
    }
}

impl Drop for Store {
    /// A store dropped without [`Store::close`] closes the same way; the
    /// report is logged instead of returned.
    fn drop(&mut self) {
        if self.pool.is_none() {
            return;
        }
        match self.shutdown() {
            Ok(report) if report.checkpoint_complete => {}
            Ok(report) => tracing::warn!(?report, "store dropped; final checkpoint incomplete"),
            Err(error) => tracing::warn!(%error, "store dropped; closing it failed"),
        }
    }
}

/// How often the maintenance thread checkpoints the write-ahead log.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);

/// Starts the store's maintenance thread. Every second it runs a passive
/// checkpoint, so that committing writers rarely have to (their automatic
/// checkpoint is only a backstop, see `connection.rs`); every `flush_interval`
/// it writes the `last_used_at` times noted by resolves; and it does both
/// once more when the store closes.
fn spawn_maintenance(
    pool: Pool<ConnectionManager<SqliteConnection>>,
    shared: Arc<Shared>,
    flush_interval: Duration,
    retention: Retention,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("keytally-maintenance".to_owned())
        .spawn(move || {
            let mut last_flush = Instant::now();
            let mut last_sweep = Instant::now();
            loop {
                let stopping = {
                    let guard = shared
                        .stopping
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    let tick = CHECKPOINT_INTERVAL.min(flush_interval);
                    let (guard, _) = shared
                        .wake_flusher
                        .wait_timeout_while(guard, tick, |stopping| !*stopping)
                        .unwrap_or_else(PoisonError::into_inner);
                    *guard
                };
                if stopping || last_flush.elapsed() >= flush_interval {
                    last_flush = Instant::now();
                    if let Err(error) = flush_last_used(&pool, &shared) {
                        tracing::warn!(%error, "could not write last_used_at; will retry");
                    }
                }
                if stopping {
                    break;
                }
                if last_sweep.elapsed() >= retention.sweep_interval {
                    last_sweep = Instant::now();
                    if let Err(error) = sweep(&pool, &shared, &retention) {
                        tracing::warn!(%error, "retention sweep failed; will retry");
                    }
                }
                let checkpoint = pool
                    .get()
                    .map_err(Error::from)
                    .and_then(|mut conn| background_checkpoint(&mut conn, &shared));
                if let Err(error) = checkpoint {
                    tracing::debug!(%error, "background checkpoint did not run");
                }
            }
        })
        .map_err(|source| Error::Io {
            path: PathBuf::from("(thread)"),
            source,
        })
}

/// The log length (in pages) from which the background checkpoint makes
/// sure the log starts over.
const RESTART_LOG_FRAMES: i64 = 1_000;

/// Copies the log into the database without holding up anyone. SQLite
/// starts the log over only when a write transaction begins with all of it
/// copied; while writers keep committing, that moment hardly comes, and the
/// log would grow until a writer checkpointed it inside its own commit
/// (`wal_autocheckpoint`). So once the log is long, the rest is copied again
/// while this process's writers wait at the gate: the next one to begin then
/// starts the log over.
fn background_checkpoint(conn: &mut SqliteConnection, shared: &Shared) -> Result<()> {
    let mut passive =
        || diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)").get_result::<CheckpointRow>(conn);
    let first = passive()?;
    if first.busy == 0 && first.log >= RESTART_LOG_FRAMES {
        let _gate = shared
            .write_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        passive()?;
    }
    Ok(())
}

/// Runs `f` in `BEGIN IMMEDIATE` on `conn` once this process's other writers
/// are done. Writers in one process then queue on a lock that wakes them in
/// turn, instead of polling SQLite's lock with growing sleeps, where an
/// unlucky writer can starve for the whole busy timeout.
fn write_with<T>(
    shared: &Shared,
    conn: &mut SqliteConnection,
    f: impl FnOnce(&mut SqliteConnection) -> Result<T>,
) -> Result<T> {
    let _gate = shared
        .write_gate
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    conn.immediate_transaction(f)
}

/// Deletes what the retention policy no longer keeps, 1,000 rows per write
/// transaction, stopping early when the store starts closing.
fn sweep(
    pool: &Pool<ConnectionManager<SqliteConnection>>,
    shared: &Shared,
    retention: &Retention,
) -> Result<()> {
    let stopping = || {
        *shared
            .stopping
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    };
    let batch = crate::events::DEFAULT_PRUNE_BATCH;
    let cutoff = |age: Duration| {
        crate::Timestamp::now().plus_millis(-i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
    };
    if let Some(age) = retention.raw_events {
        let cutoff = cutoff(age);
        let mut deleted = 0;
        loop {
            let mut conn = pool.get()?;
            let n = write_with(shared, &mut conn, |conn| {
                crate::events::delete_events_before(conn, cutoff, batch)
            })?;
            deleted += n;
            if n < batch as usize || stopping() {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, %cutoff, "retention: deleted raw events");
        }
    }
    if let Some(age) = retention.rollups {
        let cutoff_hour = cutoff(age).as_millis().div_euclid(crate::time::HOUR_MS);
        loop {
            let mut conn = pool.get()?;
            let n = write_with(shared, &mut conn, |conn| {
                crate::events::delete_rollups_before(conn, cutoff_hour, batch)
            })?;
            if n == 0 || stopping() {
                break;
            }
        }
    }
    Ok(())
}

/// Writes the noted `last_used_at` times in one transaction. On failure the
/// times are noted again, so the next flush retries them.
fn flush_last_used(
    pool: &Pool<ConnectionManager<SqliteConnection>>,
    shared: &Shared,
) -> Result<usize> {
    let noted = std::mem::take(
        &mut *shared
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    if noted.is_empty() {
        return Ok(0);
    }
    let noted: Vec<(i64, i64)> = noted.into_iter().collect();
    // Short transactions, so that recording never waits long behind them.
    for (index, chunk) in noted.chunks(LAST_USED_CHUNK).enumerate() {
        let written = pool.get().map_err(Error::from).and_then(|mut conn| {
            write_with(shared, &mut conn, |conn| keys::write_last_used(conn, chunk))
        });
        if let Err(error) = written {
            let mut pending = shared
                .last_used
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &(row_id, millis) in &noted[index * LAST_USED_CHUNK..] {
                let entry = pending.entry(row_id).or_insert(millis);
                *entry = (*entry).max(millis);
            }
            return Err(error);
        }
    }
    Ok(noted.len())
}

/// Keys whose `last_used_at` one flush transaction writes.
const LAST_USED_CHUNK: usize = 500;

/// What a `wal_checkpoint(TRUNCATE)` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    /// Whether the whole log was copied into the database and emptied.
    pub complete: bool,
    /// Frames in the log when it ran (-1 if it could not start).
    pub log_frames: i64,
    /// Frames copied into the database.
    pub checkpointed_frames: i64,
}

/// Copies the log into the database with a passive checkpoint (which never
/// blocks anyone), then empties it with `wal_checkpoint(TRUNCATE)`. TRUNCATE
/// blocks every new writer while it waits for readers, so it waits at most
/// `truncate_wait`: far less than the writers' own busy timeout, so that a
/// writer queued behind it does not run out of patience.
fn checkpoint_truncate(
    conn: &mut SqliteConnection,
    busy_timeout: Duration,
    truncate_wait: Duration,
) -> Result<CheckpointReport> {
    let passive: CheckpointRow =
        diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)").get_result(conn)?;
    let full_ms = busy_timeout.as_millis().min(i32::MAX as u128);
    let wait_ms = truncate_wait.as_millis().min(full_ms / 4);
    conn.batch_execute(&format!("PRAGMA busy_timeout = {wait_ms}"))?;
    let row =
        diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)").get_result::<CheckpointRow>(conn);
    conn.batch_execute(&format!("PRAGMA busy_timeout = {full_ms}"))?;
    let row = row?;
    Ok(CheckpointReport {
        complete: row.busy == 0 && row.log == row.checkpointed,
        log_frames: passive.log.max(row.log),
        checkpointed_frames: passive.checkpointed.max(row.checkpointed),
    })
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
