//! [`Database`]: the connection pool of one database, its write gate, and
//! the transactions the repositories run in.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::Connection;
use scheduled_thread_pool::ScheduledThreadPool;
use serde::Serialize;

use crate::db::gate::WriteGate;
use crate::db::sqlite::checkpoint;
use crate::db::sqlite::connection::ConnectionSetup;
use crate::error::{Error, Result};

/// The connection every repository runs on. Only SQLite's today: a second
/// backend turns this into an enum of connections (Diesel's
/// `MultiConnection`), and the few statements whose SQL differs match on it.
pub(crate) type Conn = diesel::SqliteConnection;

/// A connection checked out of the pool; it goes back when dropped.
pub(crate) type PooledConn = PooledConnection<ConnectionManager<Conn>>;

/// What closing the database did.
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

/// The pool of one open, migrated database, and its write gate. Cheap to
/// clone: clones share the pool and the gate.
#[derive(Clone)]
pub(crate) struct Database {
    setup: ConnectionSetup,
    /// `None` once closed.
    pool: Option<Pool<ConnectionManager<Conn>>>,
    /// The pool's worker threads. The pool's shared state holds the only
    /// other reference, so once this is the last one every pooled connection
    /// has been closed: [`Database::close`] waits for that.
    pool_threads: Arc<ScheduledThreadPool>,
    gate: Arc<WriteGate>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.setup.path)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Builds the pool of up to `pool_size` connections, each prepared by
    /// `setup`. `first`, a prepared connection, is closed only once the pool
    /// holds one of its own, so the write-ahead log is never closed and
    /// reopened in between.
    pub(crate) fn open(setup: ConnectionSetup, first: Conn, pool_size: u32) -> Result<Database> {
        let path_str = setup.path.to_str().ok_or_else(|| Error::Open {
            path: setup.path.clone(),
            source: "the path is not valid UTF-8".into(),
        })?;
        let pool_threads = Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(1)
                .thread_name_pattern("keytally-pool-{}")
                .build(),
        );
        let pool = Pool::builder()
            .thread_pool(Arc::clone(&pool_threads))
            .max_size(pool_size.max(1))
            .min_idle(Some(1))
            // A checked-out connection is used at once; a broken one shows
            // its error there. Testing each checkout would cost a query on
            // every request.
            .test_on_check_out(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connection_timeout(setup.busy_timeout.max(Duration::from_secs(1)))
            .connection_customizer(Box::new(setup.clone()))
            .build_unchecked(ConnectionManager::new(path_str));
        drop(pool.get()?);
        drop(first);
        Ok(Database {
            setup,
            pool: Some(pool),
            pool_threads,
            gate: Arc::new(WriteGate::default()),
        })
    }

    /// The database file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.setup.path
    }

    /// How long a connection waits for a lock.
    pub(crate) fn busy_timeout(&self) -> Duration {
        self.setup.busy_timeout
    }

    /// The gate every writer of this database passes.
    pub(crate) fn gate(&self) -> &WriteGate {
        &self.gate
    }

    /// Checks a connection out of the pool.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once closed, [`Error::Pool`] if none became free
    /// within the busy timeout or a new one could not be opened.
    pub(crate) fn connection(&self) -> Result<PooledConn> {
        Ok(self.pool.as_ref().ok_or(Error::Closed)?.get()?)
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`) once this
    /// database's other writers are done: it takes SQLite's write lock up
    /// front, waiting up to the busy timeout, so it never fails half-way with
    /// "database is locked". Commits if `f` returns `Ok`, rolls back
    /// otherwise.
    ///
    /// # Errors
    ///
    /// What `f` returns, [`Error::NestedWrite`] when called inside another
    /// write on the same thread, [`Error::Busy`] if the lock stayed taken, or
    /// [`Error::Pool`].
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let _turn = self.gate.enter()?;
        let mut conn = self.connection()?;
        conn.immediate_transaction(f)
    }

    /// Runs `f` in a read transaction, which sees one consistent snapshot.
    /// Only the repositories call it, with closures that only read.
    ///
    /// # Errors
    ///
    /// What `f` returns, or [`Error::Pool`].
    pub(crate) fn read<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut conn = self.connection()?;
        (*conn).transaction(f)
    }

    /// Closes the database: stops handing out connections, waits (up to the
    /// busy timeout) for checked-out ones to come back, closes the pool, then
    /// runs the final checkpoint on a connection of its own and closes it,
    /// which removes `-wal` and `-shm`.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if it was closed before; [`Error::Open`] or
    /// [`Error::Database`] if the final connection cannot be opened or the
    /// checkpoint cannot run. A checkpoint that runs but cannot complete is
    /// not an error: the report says so.
    pub(crate) fn close(&mut self) -> Result<CloseReport> {
        let Some(pool) = self.pool.take() else {
            return Err(Error::Closed);
        };
        let deadline = Instant::now() + self.setup.busy_timeout;
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
        while Arc::strong_count(&self.pool_threads) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (checkpoint, sidecars_gone) = checkpoint::final_checkpoint(&self.setup)?;
        // The caller gets the report and says what it means to its user (the
        // binary prints one warning; a store dropped unclosed logs one).
        if !checkpoint.complete {
            tracing::debug!(
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

    /// Whether the database is still open.
    pub(crate) fn is_open(&self) -> bool {
        self.pool.is_some()
    }
}
