//! How a store on PostgreSQL meets a server that goes away: a restart, a
//! crash, a connection the server terminated.
//!
//! - A connection whose server connection is gone is never handed out
//!   again: Diesel marks it broken, and the pool drops it and opens a new
//!   one when the server is back. No gateway restart is needed.
//! - A transaction whose connection was lost before its `COMMIT` was sent
//!   committed nothing: it is run again on another connection (a few
//!   times), and reported as [`Error::Unavailable`] if the server stays
//!   away.
//! - A write whose connection was lost while it committed may or may not
//!   have been committed: [`Error::CommitUnknown`]. The event sink's writes
//!   ([`Database::write_settled`]) instead look for what they wrote once
//!   the server is back, so every ticket says whether its event was stored.
//!   (Not by the transaction's id with `txid_status`: a server that crashed
//!   hands out again the ids of transactions whose commit it had not yet
//!   written, and a later transaction under the same id would answer
//!   "committed": the fault test found an acknowledged event missing
//!   while the sink relied on it.)
//! - A single-statement write whose connection libpq already knew to be
//!   gone was never sent: it is run again on another connection. One whose
//!   connection was lost after it was sent is [`Error::CommitUnknown`].
//! - A read whose connection was lost is run again on another connection.

use std::time::{Duration, Instant};

use diesel::r2d2::{ConnectionManager, PooledConnection};
use diesel::{Connection, PgConnection};

use crate::db::database::{Conn, Database, PooledConn};
use crate::error::{Error, Result};

type PgPooled = PooledConnection<ConnectionManager<PgConnection>>;

/// How many times a transaction is run again after a serialization
/// failure or a deadlock.
const RETRIES: u32 = 5;

/// How long the sink's writer waits for the server to come back to learn
/// whether a write whose commit was cut off was committed.
pub(crate) const SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// Whether `error` is a statement that never left this process: libpq
/// already knew the connection was gone, so nothing can have been run.
fn not_sent(error: &Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as Diesel};
    match error {
        Error::Unavailable { source } => matches!(
            source.downcast_ref::<Diesel>(),
            Some(Diesel::DatabaseError(
                DatabaseErrorKind::UnableToSendCommand,
                _
            ))
        ),
        _ => false,
    }
}

/// The error for a write whose connection was lost while it committed.
fn commit_unknown(error: Error) -> Error {
    match error {
        Error::Unavailable { source } => Error::CommitUnknown { source },
        other => other,
    }
}

impl Database {
    /// How many times a call is run again on another connection after its
    /// connection was found lost: every pooled connection may be dead at
    /// once (a restart, or every backend terminated), and each is dropped
    /// once found so; then one newly made.
    fn lost_retries(&self) -> u32 {
        self.pool_size() + 1
    }

    fn postgres_connection(&self) -> Result<PgPooled> {
        match self.connection()? {
            PooledConn::Postgres(conn) => Ok(conn),
            PooledConn::Sqlite(_) => Err(Error::Closed),
        }
    }

    /// [`Database::write`] on PostgreSQL.
    pub(crate) fn write_postgres<T>(
        &self,
        mut f: impl FnMut(&mut Conn<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.postgres_connection()?;
            let mut body_done = false;
            let outcome = conn.transaction(|conn| {
                let value = f(&mut Conn::Postgres(conn))?;
                body_done = true;
                Ok(value)
            });
            match outcome {
                Err(error) if error.is_transient() && tries < RETRIES => {
                    tracing::debug!(error = %error.report(), tries, "transaction retried");
                }
                Err(error @ Error::Unavailable { .. }) => {
                    if body_done {
                        return Err(commit_unknown(error));
                    }
                    if tries >= self.lost_retries() {
                        return Err(error);
                    }
                    tracing::debug!(error = %error.report(), tries, "connection lost before the commit; transaction retried");
                }
                outcome => return outcome,
            }
        }
    }

    /// [`Database::write_statement`] on PostgreSQL.
    pub(crate) fn write_statement_postgres<T>(
        &self,
        mut f: impl FnMut(&mut Conn<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.postgres_connection()?;
            match f(&mut Conn::Postgres(&mut conn)) {
                Err(error) if error.is_transient() && tries < RETRIES => {
                    tracing::debug!(error = %error.report(), tries, "statement retried");
                }
                Err(error) if not_sent(&error) && tries < self.lost_retries() => {
                    tracing::debug!(error = %error.report(), tries, "connection gone before the statement was sent; retried");
                }
                // Sent, and the statement was its own transaction.
                Err(error @ Error::Unavailable { .. }) => return Err(commit_unknown(error)),
                outcome => return outcome,
            }
        }
    }

    /// [`Database::read`] on PostgreSQL: a repeatable-read, read-only
    /// transaction, run again on another connection if its connection was
    /// lost.
    pub(crate) fn read_postgres<T>(
        &self,
        mut f: impl FnMut(&mut Conn<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.postgres_connection()?;
            let outcome = conn
                .build_transaction()
                .repeatable_read()
                .read_only()
                .run(|conn| f(&mut Conn::Postgres(conn)));
            match outcome {
                Err(Error::Unavailable { .. }) if tries < self.lost_retries() => {}
                outcome => return outcome,
            }
        }
    }

    /// [`Database::write_settled`] on PostgreSQL: if the connection is lost
    /// while the transaction commits, `stored` is asked (on another
    /// connection, once the server is back, for up to [`SETTLE_WITHIN`])
    /// whether what `f` wrote is there. [`Error::CommitUnknown`] only if the
    /// server stayed away or `stored` cannot say.
    pub(crate) fn write_settled_postgres<T>(
        &self,
        mut f: impl FnMut(&mut Conn<'_>) -> Result<T>,
        stored: impl Fn(&mut Conn<'_>, &T) -> Result<Option<bool>>,
    ) -> Result<T> {
        let _turn = self.gate().enter(false)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.postgres_connection()?;
            let mut kept = None;
            let outcome = conn.transaction(|conn| {
                kept = Some(f(&mut Conn::Postgres(conn))?);
                Ok(())
            });
            drop(conn);
            let error = match outcome {
                Ok(()) => return kept.ok_or(Error::Closed),
                Err(error) if error.is_transient() && tries < RETRIES => continue,
                Err(error @ Error::Unavailable { .. }) => error,
                Err(other) => return Err(other),
            };
            let Some(value) = kept else {
                // Lost before the commit was sent: nothing was committed.
                if tries >= self.lost_retries() {
                    return Err(error);
                }
                continue;
            };
            let deadline = Instant::now() + SETTLE_WITHIN;
            loop {
                let answer = self
                    .postgres_connection()
                    .and_then(|mut conn| stored(&mut Conn::Postgres(&mut conn), &value));
                match answer {
                    Ok(Some(true)) => return Ok(value),
                    Ok(Some(false)) => return Err(error),
                    Ok(None) => return Err(commit_unknown(error)),
                    // The server is not back yet.
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(_) => return Err(commit_unknown(error)),
                }
            }
        }
    }
}
