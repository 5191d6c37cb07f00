//! Opening one SQLite connection the keytally way: permissions checked, then
//! the pragmas, each in its own statement outside any transaction.
//!
//! [`ConnectionSetup`] is also the pool's connection customizer, so every
//! connection the pool ever opens goes through the same steps.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::r2d2::CustomizeConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};

use crate::db::sqlite::files;
use crate::error::{Error, Result};

/// The default time a connection waits for another one's write lock before
/// giving up with [`Error::Busy`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// A commit survives a crash of the process; a power loss may roll back
    /// the last commits but never corrupts the database. The default.
    #[default]
    Normal,
    /// Every commit also survives a power loss, at the cost of an fsync per
    /// commit.
    Full,
}

impl Synchronous {
    fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }

    /// The name `PRAGMA synchronous` reports for a numeric value.
    pub(crate) fn name_of(value: i64) -> &'static str {
        match value {
            0 => "off",
            1 => "normal",
            2 => "full",
            3 => "extra",
            _ => "unknown",
        }
    }
}

/// Everything needed to open and prepare one connection to the database.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSetup {
    pub(crate) path: PathBuf,
    pub(crate) synchronous: Synchronous,
    pub(crate) busy_timeout: Duration,
}

#[derive(QueryableByName)]
struct JournalMode {
    #[diesel(sql_type = Text)]
    journal_mode: String,
}

#[derive(QueryableByName)]
pub(crate) struct PragmaInteger {
    #[diesel(sql_type = BigInt)]
    pub(crate) value: i64,
}

/// Reads an integer pragma such as `user_version`.
pub(crate) fn pragma_integer(conn: &mut SqliteConnection, name: &str) -> Result<i64> {
    // Pragma names cannot be bound as parameters; callers pass fixed names.
    let row: PragmaInteger =
        diesel::sql_query(format!("SELECT {name} AS value FROM pragma_{name}")).get_result(conn)?;
    Ok(row.value)
}

impl ConnectionSetup {
    /// The database path as SQLite wants it.
    fn path_str(&self) -> Result<&str> {
        self.path.to_str().ok_or_else(|| Error::Open {
            path: self.path.clone(),
            source: "the path is not valid UTF-8".into(),
        })
    }

    /// Opens a new connection and prepares it (see [`ConnectionSetup::prepare`]).
    pub(crate) fn establish(&self) -> Result<SqliteConnection> {
        let mut conn = SqliteConnection::establish(self.path_str()?).map_err(|e| Error::Open {
            path: self.path.clone(),
            source: Box::new(e),
        })?;
        self.prepare(&mut conn)?;
        Ok(conn)
    }

    /// Checks the files' modes, then sets the pragmas: `busy_timeout` first,
    /// then `journal_mode=WAL` (verified), `synchronous` and `foreign_keys`.
    /// None of them can take effect inside a transaction, so this runs on a
    /// connection that has none open.
    pub(crate) fn prepare(&self, conn: &mut SqliteConnection) -> Result<()> {
        files::tighten_modes(&self.path)?;
        let busy_ms = self.busy_timeout.as_millis().min(i32::MAX as u128);
        conn.batch_execute(&format!("PRAGMA busy_timeout = {busy_ms}"))?;
        let mode = self.switch_to_wal(conn)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::WalUnsupported {
                path: self.path.clone(),
                journal_mode: mode,
            });
        }
        conn.batch_execute(&format!(
            "PRAGMA synchronous = {}",
            self.synchronous.pragma_value()
        ))?;
        conn.batch_execute("PRAGMA foreign_keys = ON")?;
        // The store's maintenance thread checkpoints every second; a writer
        // checkpoints by itself, inside its commit, only if the log
        // reaches 40,000 pages (about 160 MiB), instead of SQLite's default
        // of 1,000. A large batch alone can write over 10,000 pages.
        conn.batch_execute("PRAGMA wal_autocheckpoint = 40000")?;
        // An 8 MiB page cache, so a large batch does not spill pages to the
        // log before its commit.
        conn.batch_execute("PRAGMA cache_size = -8192")?;
        // Switching to WAL may have created the sidecar files just now.
        files::tighten_modes(&self.path)?;
        Ok(())
    }

    /// Runs `PRAGMA journal_mode = WAL` and returns the mode SQLite reports.
    ///
    /// Switching a new database into WAL takes an exclusive lock, and SQLite
    /// reports "database is locked" at once, without calling the busy
    /// handler, when another connection switches it at the same moment (two
    /// processes opening a fresh database). So busy is retried here, within
    /// the busy timeout.
    fn switch_to_wal(&self, conn: &mut SqliteConnection) -> Result<String> {
        let deadline = Instant::now() + self.busy_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match diesel::sql_query("PRAGMA journal_mode = WAL").get_result::<JournalMode>(conn) {
                Ok(mode) => return Ok(mode.journal_mode),
                Err(error) => match Error::from(error) {
                    Error::Busy { .. } if Instant::now() < deadline => {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(50));
                    }
                    other => return Err(other),
                },
            }
        }
    }
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for ConnectionSetup {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        self.prepare(conn).map_err(|error| match error {
            Error::Database(inner) => diesel::r2d2::Error::QueryError(inner),
            other => diesel::r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(
                other.to_string(),
            )),
        })
    }
}
