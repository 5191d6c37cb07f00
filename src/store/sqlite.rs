//! What a store can do only on SQLite: its status and checks, checkpoints,
//! backups and restores, and raw access to its SQLite connections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, PooledConnection};
use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use serde::Serialize;

use crate::db::database::Conn;
use crate::db::sqlite::backup::{self, BackupReport};
use crate::db::sqlite::check::{self, CheckReport};
use crate::db::sqlite::checkpoint::{self, CheckpointReport};
use crate::db::sqlite::connection::{pragma_integer, Synchronous};
use crate::db::sqlite::files::{self, FileInfo};
use crate::db::sqlite::migrations;
use crate::db::sqlite::restore::{self as restoring, RestoreReport};
use crate::error::{Error, Result};
use crate::store::options::StoreOptions;
use crate::store::Store;

/// A connection to a store's SQLite database, checked out of its pool; it
/// goes back when dropped.
pub type SqlitePooledConnection = PooledConnection<ConnectionManager<SqliteConnection>>;

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

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    value: String,
}

impl Store {
    /// Reports the SQLite database's settings, schema version and files
    /// (on PostgreSQL, see `Store::postgres_status`).
    ///
    /// # Errors
    ///
    /// [`crate::Error::SqliteOnly`] on PostgreSQL, [`crate::Error::Database`],
    /// [`crate::Error::Io`] or [`crate::Error::Pool`].
    pub fn status(&self) -> Result<Status> {
        let mut conn = self.db.sqlite_connection("status")?;
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
    /// [`crate::Error::Pool`] or [`crate::Error::Database`]. A checkpoint that runs but
    /// cannot complete is not an error: the report says so.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        let mut conn = self.db.sqlite_connection("checkpoint")?;
        checkpoint::checkpoint_truncate(&mut conn, self.db.busy_timeout(), Duration::ZERO)
    }

    /// Writes a consistent snapshot of the database to `destination`, while
    /// other connections keep writing: `VACUUM INTO` a temporary file beside
    /// it (mode 0600), fsynced, checked, then renamed into place. An existing
    /// destination is replaced only with `replace`.
    ///
    /// # Errors
    ///
    /// [`crate::Error::DestinationExists`], [`crate::Error::InvalidInput`]
    /// for the database's own path or a link, [`crate::Error::Corrupt`] if
    /// the copy fails its check, [`crate::Error::DiskFull`],
    /// [`crate::Error::Io`] or the store's errors. On error nothing is left
    /// at `destination` that was not there before.
    pub fn backup_to(&self, destination: &Path, replace: bool) -> Result<BackupReport> {
        self.backup_with_progress(destination, replace, |_, _| {})
    }

    /// [`Store::backup_to`], calling `progress(written, total)` about ten
    /// times a second while the copy is written: the bytes in the copy so
    /// far, and the database file's size (the copy ends at most that
    /// large, as it leaves free pages out).
    ///
    /// # Errors
    ///
    /// As [`Store::backup_to`].
    pub fn backup_with_progress(
        &self,
        destination: &Path,
        replace: bool,
        progress: impl Fn(u64, u64) + Sync,
    ) -> Result<BackupReport> {
        let mut conn = self.db.sqlite_connection("backup")?;
        let total = std::fs::metadata(self.path()).map_or(0, |metadata| metadata.len());
        backup::write_backup(&mut conn, self.path(), destination, replace, &|written| {
            progress(written, total);
        })
    }

    /// Runs SQLite's `quick_check`: every page of the database is read and
    /// its structure checked (not the indexes against their tables, which
    /// only [`Store::check`] does). For a bulk write about to begin: it
    /// costs about 0.7 s for a million events and 6 s for ten million on
    /// this project's benchmark machine, so it does not run at every open.
    /// On PostgreSQL it does nothing (the server checks its own pages).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Corrupt`] naming what it found, or the store's
    /// errors.
    pub fn quick_check(&self) -> Result<()> {
        if self.backend() != crate::Backend::Sqlite {
            return Ok(());
        }
        let mut conn = self.db.sqlite_connection("quick_check")?;
        let found = backup::quick_check_lines(&mut conn)?;
        if found == ["ok"] {
            return Ok(());
        }
        Err(crate::Error::Corrupt {
            path: self.path().to_path_buf(),
            detail: format!(
                "quick_check: {}",
                found.into_iter().take(3).collect::<Vec<_>>().join("; ")
            ),
        })
    }

    /// Runs `integrity_check` and `foreign_key_check` and checks the
    /// application id, the schema version and the files' modes, including
    /// any this store tightened when it opened. Problems are reported, not
    /// returned as errors.
    ///
    /// # Errors
    ///
    /// The store's errors if the checks themselves cannot run.
    pub fn check(&self) -> Result<CheckReport> {
        #[cfg(feature = "postgres")]
        if self.backend() == crate::Backend::Postgres {
            return self.postgres_check();
        }
        let mut conn = self.db.sqlite_connection("check")?;
        let mut report = check::check(&mut conn, self.path())?;
        // Opening the store already tightened what was too wide: that is
        // still a finding.
        for file in self.tightened_at_open() {
            report.problems.push(format!(
                "{} had mode {:04o} when the store opened (tightened to 0600)",
                file.path.display(),
                file.found_mode
            ));
        }
        Ok(report)
    }

    /// A raw SQLite connection of the store's pool, with its pragmas set: for
    /// tests and for maintenance only SQLite has. The repositories' rules
    /// (writes in `BEGIN IMMEDIATE`, behind the store's write gate) are the
    /// caller's to keep; prefer [`Store::sqlite_write`] for writing.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Closed`] or [`crate::Error::Pool`].
    pub fn sqlite_connection(&self) -> Result<SqlitePooledConnection> {
        self.db.sqlite_connection("raw SQLite access")
    }

    /// Runs `f` on a raw SQLite connection in a write transaction (`BEGIN
    /// IMMEDIATE`), queued behind the store's other writers; commits if it
    /// returns `Ok`. For tests and for maintenance only SQLite has.
    ///
    /// # Errors
    ///
    /// What `f` returns, [`crate::Error::NestedWrite`] when called inside
    /// another write of this store on the same thread,
    /// [`crate::Error::Busy`] if the lock stayed taken, or
    /// [`crate::Error::Pool`].
    pub fn sqlite_write<T>(&self, f: impl FnOnce(&mut SqliteConnection) -> Result<T>) -> Result<T> {
        let mut f = Some(f);
        self.db.write(|conn| match (conn, f.take()) {
            (Conn::Sqlite(conn), Some(f)) => f(conn),
            _ => Err(Error::SqliteOnly {
                operation: "raw SQLite access",
            }),
        })
    }
}

/// Replaces the database at `database` with the backup `source`, keeping
/// the replaced one as `<name>.pre-restore-<time>`, then migrates it.
///
/// The backup is copied beside the database and verified (keytally's
/// application id, `integrity_check`, no migration this binary does not
/// know) before anything else is touched. The current database is then
/// locked exclusively through SQLite, which is refused while another process
/// has it open; under that one lock its pages are kept aside and the
/// backup's written into the database file itself, so a process that opens
/// the file meanwhile waits and then reads the restored database.
///
/// # Errors
///
/// [`crate::Error::NotADatabase`], [`crate::Error::Corrupt`],
/// [`crate::Error::Foreign`] or [`crate::Error::SchemaTooNew`] for a bad
/// source (nothing is changed), [`crate::Error::InUse`] if another process
/// has the database open, or file system errors.
pub fn restore(database: &Path, source: &Path, options: &StoreOptions) -> Result<RestoreReport> {
    let previous = restoring::install_backup(database, source)?;
    let store = options.clone().with_path(database).open()?;
    let applied = store.applied_at_open().to_vec();
    let _ = store.close()?;
    tracing::info!(database = %database.display(), source = %source.display(), "restored");
    Ok(RestoreReport {
        path: database.to_path_buf(),
        previous,
        applied,
    })
}
