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
    pub(crate) access: Access,
}

/// How a store's connections open the database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reading and writing: the normal store.
    ReadWrite,
    /// `mode=ro`: SQLite writes nothing to the database or its log, and
    /// nothing changes the files' modes or the journal mode. It still
    /// needs the `-wal` and `-shm` files, creating them (empty) if there
    /// are none; `tidy` says it did, so the close removes them again.
    ReadOnly {
        /// Neither `-wal` nor `-shm` was there at open.
        tidy: bool,
    },
    /// `mode=ro&immutable=1`: no `-shm` and no locks either, for a
    /// database whose log is absent or empty and whose `-shm` cannot be
    /// made or used (a read-only filesystem, a full disk). Only safe while
    /// no other process writes the database, which an empty log shows at
    /// the moment it is opened.
    Immutable,
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

    /// What SQLite opens: the path, or a `file:` URI with the read-only
    /// parameters.
    pub(crate) fn open_name(&self) -> Result<String> {
        let path = self.path_str()?;
        let query = match self.access {
            Access::ReadWrite => return Ok(path.to_owned()),
            Access::ReadOnly { .. } => "mode=ro",
            Access::Immutable => "mode=ro&immutable=1",
        };
        // A URI's path escapes what would end it or start an escape.
        let mut escaped = String::with_capacity(path.len());
        for c in path.chars() {
            match c {
                '%' => escaped.push_str("%25"),
                '?' => escaped.push_str("%3f"),
                '#' => escaped.push_str("%23"),
                other => escaped.push(other),
            }
        }
        Ok(format!("file:{escaped}?{query}"))
    }

    /// Opens a new connection and prepares it (see [`ConnectionSetup::prepare`]).
    pub(crate) fn establish(&self) -> Result<SqliteConnection> {
        let mut conn =
            SqliteConnection::establish(&self.open_name()?).map_err(|e| Error::Open {
                path: self.path.clone(),
                source: Box::new(e),
            })?;
        self.prepare(&mut conn)?;
        Ok(conn)
    }

    /// [`Self::establish`], then a first read, which opens the log's index
    /// (and so fails here, not later, where the `-shm` cannot be made).
    pub(crate) fn establish_and_read(&self) -> Result<SqliteConnection> {
        let mut conn = self.establish()?;
        conn.batch_execute("SELECT count(*) FROM sqlite_master")?;
        Ok(conn)
    }

    /// After a read-only store created the log's files and its connections
    /// are closed: if the log is still empty (no other process wrote
    /// since), one plain connection opened and closed removes both, as
    /// SQLite's last connection does; with nothing in the log, that writes
    /// nothing to the database.
    pub(crate) fn tidy_after_read_only(&self) {
        let log_empty = std::fs::metadata(files::sidecar(&self.path, "-wal"))
            .is_ok_and(|metadata| metadata.len() == 0);
        let Ok(path) = self.path_str() else {
            return;
        };
        if log_empty {
            if let Ok(mut conn) = SqliteConnection::establish(path) {
                let _ = conn.batch_execute("SELECT count(*) FROM sqlite_master");
            }
        }
    }

    /// Checks the files' modes, then sets the pragmas: `busy_timeout` first,
    /// then `journal_mode=WAL` (verified), `synchronous` and `foreign_keys`.
    /// None of them can take effect inside a transaction, so this runs on a
    /// connection that has none open.
    pub(crate) fn prepare(&self, conn: &mut SqliteConnection) -> Result<()> {
        let busy_ms = self.busy_timeout.as_millis().min(i32::MAX as u128);
        if self.access != Access::ReadWrite {
            // Nothing that writes: no mode change, no journal mode.
            conn.batch_execute(&format!(
                "PRAGMA busy_timeout = {busy_ms}; PRAGMA foreign_keys = ON; \
                 PRAGMA cache_size = -8192"
            ))?;
            return Ok(());
        }
        files::tighten_modes(&self.path)?;
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
