//! [`Database`]: the connection pool of one database, its write gate, and
//! the transactions the repositories run in.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::r2d2::{ConnectionManager, ManageConnection, Pool, PooledConnection};
use diesel::{Connection, SqliteConnection};
use scheduled_thread_pool::ScheduledThreadPool;
use serde::Serialize;

use crate::db::gate::WriteGate;
#[cfg(feature = "postgres")]
use crate::db::postgres::connection::PgSetup;
use crate::db::sqlite::checkpoint;
use crate::db::sqlite::connection::{Access, ConnectionSetup};
use crate::error::{Error, Result};

/// One connection of the store's backend, as the repositories see it inside
/// a transaction or a read. Statements that are the same on both backends
/// are written once with [`on_backend!`], which type-checks them against
/// each connection; the few whose SQL differs match on it.
pub(crate) enum Conn<'a> {
    /// The embedded SQLite.
    Sqlite(&'a mut SqliteConnection),
    /// A PostgreSQL server.
    #[cfg(feature = "postgres")]
    Postgres(&'a mut diesel::PgConnection),
}

impl Conn<'_> {
    /// Inside a write transaction: makes every recorder wait until it ends,
    /// after waiting for those under way, so what the transaction reads of
    /// `events` is every event there is until it commits. On PostgreSQL
    /// `events` is locked in `SHARE` mode; SQLite's write transaction
    /// already excludes every other writer.
    pub(crate) fn hold_off_recorders(&mut self) -> Result<()> {
        match self {
            Conn::Sqlite(_) => Ok(()),
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => {
                diesel::connection::SimpleConnection::batch_execute(
                    &mut **c,
                    "LOCK TABLE events IN SHARE MODE",
                )?;
                Ok(())
            }
        }
    }
}

/// Runs `$body` with `$c` bound to the connection of whichever backend
/// `$conn` (a `&mut Conn`) is on: the body is compiled once per backend,
/// so each runs its own prepared, native statement.
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::database::Conn::Sqlite(inner) => {
                let $c: &mut diesel::SqliteConnection = inner;
                $body
            }
            #[cfg(feature = "postgres")]
            $crate::db::database::Conn::Postgres(inner) => {
                let $c: &mut diesel::PgConnection = inner;
                $body
            }
        }
    };
}
pub(crate) use on_backend;

/// A connection checked out of the pool; it goes back when dropped.
pub(crate) enum PooledConn {
    /// From an SQLite pool.
    Sqlite(PooledConnection<ConnectionManager<SqliteConnection>>),
    /// From a PostgreSQL pool.
    #[cfg(feature = "postgres")]
    Postgres(PooledConnection<ConnectionManager<diesel::PgConnection>>),
}

impl PooledConn {
    /// The connection, for the repositories' functions.
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            PooledConn::Sqlite(conn) => Conn::Sqlite(conn),
            #[cfg(feature = "postgres")]
            PooledConn::Postgres(conn) => Conn::Postgres(conn),
        }
    }
}

/// The pool of one backend.
#[derive(Clone)]
enum Pools {
    Sqlite(Pool<ConnectionManager<SqliteConnection>>),
    #[cfg(feature = "postgres")]
    Postgres(Pool<ConnectionManager<diesel::PgConnection>>),
}

/// Where the database is and how each connection to it is prepared.
#[derive(Clone)]
pub(crate) enum Target {
    /// An SQLite file.
    Sqlite(ConnectionSetup),
    /// A PostgreSQL database.
    #[cfg(feature = "postgres")]
    Postgres(PgSetup),
}

/// Which backend a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded SQLite.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        })
    }
}

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
    /// Whether Litestream replicates the database (its `_litestream_seq`
    /// table is there). Litestream keeps a read open on the database, so the
    /// final checkpoint does not wait for readers (it could never complete)
    /// and the log stays for Litestream to checkpoint; nothing is lost.
    pub replicated_by_litestream: bool,
}

/// The pool of one open, migrated database, and its write gate. Cheap to
/// clone: clones share the pool and the gate.
#[derive(Clone)]
pub(crate) struct Database {
    target: Target,
    /// `None` once closed.
    pool: Option<Pools>,
    /// The pool's worker threads. The pool's shared state holds the only
    /// other reference, so once this is the last one every pooled connection
    /// has been closed: [`Database::close`] waits for that.
    pool_threads: Arc<ScheduledThreadPool>,
    gate: Arc<WriteGate>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

/// A pool's worker threads, one for each pool.
fn pool_threads() -> Arc<ScheduledThreadPool> {
    Arc::new(
        ScheduledThreadPool::builder()
            .num_threads(1)
            .thread_name_pattern("keytally-pool-{}")
            .build(),
    )
}

/// A pool of up to `size` connections made by `manager`, waiting up to
/// `timeout` for a free one.
fn build_pool<M: ManageConnection<Error = diesel::r2d2::Error>>(
    manager: M,
    threads: &Arc<ScheduledThreadPool>,
    size: u32,
    timeout: Duration,
    customizer: Box<dyn diesel::r2d2::CustomizeConnection<M::Connection, diesel::r2d2::Error>>,
) -> Pool<M> {
    Pool::builder()
        .thread_pool(Arc::clone(threads))
        .max_size(size.max(1))
        .min_idle(Some(1))
        // A checked-out connection is used at once; a broken one shows
        // its error there. Testing each checkout would cost a query on
        // every request.
        .test_on_check_out(false)
        .idle_timeout(None)
        .max_lifetime(None)
        .connection_timeout(timeout.max(Duration::from_secs(1)))
        .connection_customizer(customizer)
        .build_unchecked(manager)
}

/// Waits until `pool` has every connection back or `deadline` passes;
/// returns how many were still out.
fn wait_for_connections<M: ManageConnection>(pool: &Pool<M>, deadline: Instant) -> u32 {
    loop {
        let state = pool.state();
        let out = state.connections - state.idle_connections;
        if out == 0 || Instant::now() >= deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Database {
    /// Builds the pool of up to `pool_size` SQLite connections, each
    /// prepared by `setup`. `first`, a prepared connection, is closed only
    /// once the pool holds one of its own, so the write-ahead log is never
    /// closed and reopened in between.
    pub(crate) fn open(
        setup: ConnectionSetup,
        first: SqliteConnection,
        pool_size: u32,
    ) -> Result<Database> {
        let open_name = setup.open_name()?;
        let pool_threads = pool_threads();
        let pool = build_pool(
            ConnectionManager::<SqliteConnection>::new(open_name),
            &pool_threads,
            pool_size,
            setup.busy_timeout,
            Box::new(setup.clone()),
        );
        drop(pool.get()?);
        drop(first);
        Ok(Database {
            target: Target::Sqlite(setup),
            pool: Some(Pools::Sqlite(pool)),
            pool_threads,
            gate: Arc::new(WriteGate::default()),
        })
    }

    /// Builds the pool of up to `pool_size` PostgreSQL connections, each
    /// prepared by `setup`, and checks that one can be opened.
    #[cfg(feature = "postgres")]
    pub(crate) fn open_postgres(setup: PgSetup, pool_size: u32) -> Result<Database> {
        let pool_threads = pool_threads();
        let pool = build_pool(
            ConnectionManager::<diesel::PgConnection>::new(setup.url()),
            &pool_threads,
            pool_size,
            setup.busy_timeout,
            Box::new(setup.clone()),
        );
        drop(pool.get()?);
        Ok(Database {
            target: Target::Postgres(setup),
            pool: Some(Pools::Postgres(pool)),
            pool_threads,
            gate: Arc::new(WriteGate::default()),
        })
    }

    /// The PostgreSQL database's connection setup, or `None` on SQLite.
    #[cfg(feature = "postgres")]
    pub(crate) fn postgres_setup(&self) -> Option<&PgSetup> {
        match &self.target {
            Target::Postgres(setup) => Some(setup),
            Target::Sqlite(_) => None,
        }
    }

    /// The SQLite database's connection setup, or `None` on PostgreSQL.
    pub(crate) fn sqlite_setup(&self) -> Option<&ConnectionSetup> {
        match &self.target {
            Target::Sqlite(setup) => Some(setup),
            #[cfg(feature = "postgres")]
            Target::Postgres(_) => None,
        }
    }

    /// The backend this database is on.
    pub(crate) fn backend(&self) -> Backend {
        match &self.target {
            Target::Sqlite(_) => Backend::Sqlite,
            #[cfg(feature = "postgres")]
            Target::Postgres(_) => Backend::Postgres,
        }
    }

    /// The SQLite file's path; for PostgreSQL, the URL with its password
    /// left out.
    pub(crate) fn path(&self) -> &Path {
        match &self.target {
            Target::Sqlite(setup) => &setup.path,
            #[cfg(feature = "postgres")]
            Target::Postgres(setup) => Path::new(setup.redacted()),
        }
    }

    /// How long a connection waits for a lock.
    pub(crate) fn busy_timeout(&self) -> Duration {
        match &self.target {
            Target::Sqlite(setup) => setup.busy_timeout,
            #[cfg(feature = "postgres")]
            Target::Postgres(setup) => setup.busy_timeout,
        }
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
        Ok(match self.pool.as_ref().ok_or(Error::Closed)? {
            Pools::Sqlite(pool) => PooledConn::Sqlite(pool.get()?),
            #[cfg(feature = "postgres")]
            Pools::Postgres(pool) => PooledConn::Postgres(pool.get()?),
        })
    }

    /// Checks an SQLite connection out of the pool, for what only SQLite
    /// has.
    ///
    /// # Errors
    ///
    /// [`Error::SqliteOnly`] on PostgreSQL, or as [`Database::connection`].
    #[cfg_attr(
        not(feature = "postgres"),
        expect(unused_variables, reason = "only PostgreSQL refuses")
    )]
    pub(crate) fn sqlite_connection(
        &self,
        operation: &'static str,
    ) -> Result<PooledConnection<ConnectionManager<SqliteConnection>>> {
        match self.connection()? {
            PooledConn::Sqlite(conn) => Ok(conn),
            #[cfg(feature = "postgres")]
            PooledConn::Postgres(_) => Err(Error::SqliteOnly { operation }),
        }
    }

    /// Runs `f` in a write transaction once this process's other writers of
    /// this database are done. On SQLite the transaction is `BEGIN
    /// IMMEDIATE`: it takes the write lock up front, waiting up to the busy
    /// timeout, so it never fails half-way with "database is locked". On
    /// PostgreSQL a transaction that fails on a serialization failure or a
    /// deadlock is rolled back and `f` runs again, up to five times. Commits
    /// if `f` returns `Ok`, rolls back otherwise.
    ///
    /// # Errors
    ///
    /// What `f` returns, [`Error::NestedWrite`] when called inside another
    /// write on the same thread, [`Error::Busy`] if the lock stayed taken, or
    /// [`Error::Pool`].
    pub(crate) fn write<T>(&self, mut f: impl FnMut(&mut Conn<'_>) -> Result<T>) -> Result<T> {
        // SQLite has one writer at a time: this process's writers queue at
        // the gate. PostgreSQL's writers run side by side; the gate only
        // refuses a nested write, which would wait for itself.
        let queue = self.backend() == Backend::Sqlite;
        let _turn = self.gate.enter(queue)?;
        #[cfg(feature = "postgres")]
        if !queue {
            return self.write_postgres(f);
        }
        match self.connection()? {
            PooledConn::Sqlite(mut conn) => {
                conn.immediate_transaction(|conn| f(&mut Conn::Sqlite(conn)))
            }
            #[cfg(feature = "postgres")]
            PooledConn::Postgres(_) => Err(Error::Closed),
        }
    }

    /// Runs `f`, which writes with one statement, once this process's
    /// other writers of this database are done: on SQLite in a write
    /// transaction, as [`Database::write`]; on PostgreSQL as that one
    /// statement, which is its own transaction (one round trip fewer on
    /// either side of it), run again as `write` runs a transaction again.
    ///
    /// # Errors
    ///
    /// As [`Database::write`].
    #[cfg(feature = "postgres")]
    pub(crate) fn write_statement<T>(
        &self,
        f: impl FnMut(&mut Conn<'_>) -> Result<T>,
    ) -> Result<T> {
        match self.target {
            Target::Sqlite(_) => self.write(f),
            Target::Postgres(_) => {
                let _turn = self.gate.enter(false)?;
                self.write_statement_postgres(f)
            }
        }
    }

    /// Runs `f` as [`Database::write`] does, in a transaction whose outcome
    /// is always known: on PostgreSQL a commit cut off by a lost connection
    /// is settled by asking `stored` (with what `f` returned) once the
    /// server is back (`postgres/faults.rs`). For the event sink, whose
    /// tickets say whether each event was stored.
    ///
    /// # Errors
    ///
    /// As [`Database::write`].
    #[cfg_attr(
        not(feature = "postgres"),
        expect(unused_variables, reason = "only PostgreSQL asks")
    )]
    pub(crate) fn write_settled<T>(
        &self,
        f: impl FnMut(&mut Conn<'_>) -> Result<T>,
        stored: impl Fn(&mut Conn<'_>, &T) -> Result<Option<bool>>,
    ) -> Result<T> {
        #[cfg(feature = "postgres")]
        if self.backend() == Backend::Postgres {
            return self.write_settled_postgres(f, stored);
        }
        self.write(f)
    }

    /// Runs `f` in a read transaction, which sees one consistent snapshot.
    /// Only the repositories call it, with closures that only read.
    ///
    /// # Errors
    ///
    /// What `f` returns, or [`Error::Pool`].
    pub(crate) fn read<T>(&self, f: impl FnMut(&mut Conn<'_>) -> Result<T>) -> Result<T> {
        #[cfg(feature = "postgres")]
        if self.backend() == Backend::Postgres {
            return self.read_postgres(f);
        }
        let mut f = f;
        match self.connection()? {
            PooledConn::Sqlite(mut conn) => conn.transaction(|conn| f(&mut Conn::Sqlite(conn))),
            #[cfg(feature = "postgres")]
            PooledConn::Postgres(_) => Err(Error::Closed),
        }
    }

    /// Closes the database: stops handing out connections, waits (up to the
    /// busy timeout) for checked-out ones to come back, closes the pool; on
    /// SQLite, then runs the final checkpoint on a connection of its own and
    /// closes it, which removes `-wal` and `-shm`.
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
        let deadline = Instant::now() + self.busy_timeout();
        let connections_still_out = match &pool {
            Pools::Sqlite(pool) => wait_for_connections(pool, deadline),
            #[cfg(feature = "postgres")]
            Pools::Postgres(pool) => wait_for_connections(pool, deadline),
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
        // The count alone can say "done" too early: when the pool's worker
        // thread ends a job that held the last reference to the pool, the
        // pool drops its handle on the worker before its idle connections
        // (r2d2 declares its config before them), so the last connections
        // may still be closing there. A job queued behind it runs only once
        // that job, and the drop it ends with, is over. Without this wait the
        // final checkpoint's connection is not the last to close, and a
        // process that exits at once leaves an empty -wal and the -shm.
        let (done, finished) = std::sync::mpsc::channel();
        self.pool_threads.execute(move || {
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let setup = match &self.target {
            Target::Sqlite(setup) => setup,
            #[cfg(feature = "postgres")]
            Target::Postgres(_) => {
                // A server keeps its own log; there is nothing to checkpoint.
                return Ok(CloseReport {
                    checkpoint_complete: true,
                    log_frames: 0,
                    checkpointed_frames: 0,
                    connections_still_out,
                    sidecars_gone: true,
                    replicated_by_litestream: false,
                });
            }
        };
        if setup.access != Access::ReadWrite {
            // A read-only store wrote nothing and may write nothing; it
            // removes the empty log files it made.
            if setup.access == (Access::ReadOnly { tidy: true }) {
                setup.tidy_after_read_only();
            }
            return Ok(CloseReport {
                checkpoint_complete: true,
                log_frames: 0,
                checkpointed_frames: 0,
                connections_still_out,
                sidecars_gone: checkpoint::sidecars_gone(&setup.path),
                replicated_by_litestream: false,
            });
        }
        let (checkpoint, sidecars_gone, replicated_by_litestream) =
            checkpoint::final_checkpoint(setup)?;
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
            replicated_by_litestream,
        })
    }

    /// Whether the database is still open.
    /// The most connections the pool holds (0 once closed): how many dead
    /// ones a caller may draw in a row after the server went away.
    pub(crate) fn pool_size(&self) -> u32 {
        match &self.pool {
            Some(Pools::Sqlite(pool)) => pool.max_size(),
            #[cfg(feature = "postgres")]
            Some(Pools::Postgres(pool)) => pool.max_size(),
            None => 0,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.pool.is_some()
    }
}
