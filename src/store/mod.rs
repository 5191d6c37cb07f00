//! [`Store`]: an opened, migrated keytally database, the facade over the
//! repositories. `open` makes the database safe to use before a `Store`
//! exists; `close` (or dropping it) checkpoints and leaves no sidecar files.

pub(crate) mod maintenance;
pub(crate) mod options;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod sqlite;

use std::path::Path;
use std::sync::Arc;

use crate::db::classify;
use crate::db::database::{Backend, CloseReport, Database};
use crate::db::key_changes::{KeyChangeWatch, WatchThread};
use crate::db::sqlite::connection::{Access, ConnectionSetup};
use crate::db::sqlite::files::{self, TightenedFile};
use crate::db::sqlite::migrations;
use crate::error::{Error, Result};
use crate::model::location::Location;
use crate::repositories::events::Events;
use crate::repositories::keys::{KeyMemory, Keys};
use crate::repositories::models::ModelIds;
use crate::repositories::prices::Prices;
use crate::store::maintenance::Maintenance;
use crate::store::options::ResolveMode;
use crate::store::options::StoreOptions;

/// An open keytally database whose migrations have all run.
///
/// A `Store` exists only once its schema is current, so nothing can read or
/// write through it before the migrations are done. Every connection it hands
/// out has had the permissions checked and the pragmas applied. Share it
/// between threads behind an `Arc`; call [`Store::close`] on shutdown.
pub struct Store {
    db: Database,
    keys: Arc<KeyMemory>,
    models: ModelIds,
    /// None for a read-only store, which writes nothing.
    maintenance: Option<Maintenance>,
    read_only: bool,
    applied_at_open: Vec<String>,
    tightened_at_open: Vec<TightenedFile>,
    /// The thread that keeps the count of key changes in notified mode.
    watcher: Option<WatchThread>,
    /// Declared last, so dropped after the pool: while it lives, nothing in
    /// this process opens the SQLite database file with plain I/O.
    _claim: Option<files::OpenClaim>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    /// Opens the store; see [`Store::open`].
    ///
    /// # Errors
    ///
    /// As [`Store::open`].
    pub fn open(&self) -> Result<Store> {
        Store::open_with(self)
    }
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
        let keys = Arc::new(KeyMemory::new(
            &options.secret_prefix,
            options.key_cache_size,
        )?);
        let (db, applied_at_open, tightened_at_open, claim) = match &options.location {
            Location::Sqlite(path) => {
                let (db, applied, tightened, claim) = open_sqlite(path, options)?;
                (db, applied, tightened, Some(claim))
            }
            Location::Postgres(_) if options.read_only => {
                return Err(Error::SqliteOnly {
                    operation: "a read-only store",
                });
            }
            Location::Postgres(url) => {
                let (db, applied) = open_postgres(url, options)?;
                (db, applied, Vec::new(), None)
            }
        };
        let watcher = match options.resolve_mode {
            ResolveMode::Strict => None,
            ResolveMode::Notified => {
                let watch = KeyChangeWatch::new();
                let thread = start_watcher(&db, &watch)?;
                let _ = keys.watch.set(watch);
                Some(thread)
            }
        };
        let maintenance = if options.read_only {
            None
        } else {
            Some(Maintenance::start(
                db.clone(),
                Arc::clone(&keys),
                options.last_used_flush_interval,
                options.retention,
            )?)
        };
        Ok(Store {
            db,
            keys,
            models: ModelIds::default(),
            maintenance,
            read_only: options.read_only,
            applied_at_open,
            tightened_at_open,
            watcher,
            _claim: claim,
        })
    }

    /// Which backend the store runs on.
    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// The SQLite database file's path; for PostgreSQL, its URL with the
    /// password left out.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// Whether the store was opened read-only ([`StoreOptions::read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
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

    /// Whether resolves are, at this moment, answered from what the store's
    /// key-change watcher knows ([`crate::ResolveMode::Notified`] with the
    /// watcher current) rather than by asking the database. Always false in
    /// strict mode; false in notified mode while the watcher is behind or
    /// its connection is lost, when resolves ask the database instead. A
    /// gateway can expose it as a health detail.
    pub fn resolves_from_notifications(&self) -> bool {
        self.keys.resolves_from_notifications()
    }

    /// The keys repository: create, resolve, revoke, rotate, update, list.
    pub fn keys(&self) -> Keys<'_> {
        Keys::new(&self.db, &self.keys)
    }

    /// The events repository: record, batch, list, prune, usage.
    pub fn events(&self) -> Events<'_> {
        Events::new(&self.db, &self.keys, &self.models)
    }

    /// The prices repository: what each model's tokens cost, from which
    /// time on.
    pub fn prices(&self) -> Prices<'_> {
        Prices::new(&self.db, &self.models)
    }

    /// Closes the store: stops the maintenance thread (which writes the
    /// `last_used_at` times noted last), stops handing out connections,
    /// waits (up to the busy timeout) for checked-out ones to come back,
    /// closes the pool, then runs `PRAGMA wal_checkpoint(TRUNCATE)` on the
    /// last connection and closes it, which removes `-wal` and `-shm`.
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
        if !self.db.is_open() {
            return Err(Error::Closed);
        }
        if let Some(maintenance) = &mut self.maintenance {
            maintenance.stop();
        }
        // The watcher's connection is closed before the final checkpoint.
        if let Some(watcher) = &mut self.watcher {
            watcher.stop();
        }
        self.db.close()
    }
}

/// Opens and migrates the SQLite database at `path`.
fn open_sqlite(
    path: &Path,
    options: &StoreOptions,
) -> Result<(Database, Vec<String>, Vec<TightenedFile>, files::OpenClaim)> {
    if options.read_only {
        return open_sqlite_read_only(path, options);
    }
    files::prepare_database_path(path)?;
    // Refuse what is not ours before SQLite (or a chmod) touches it.
    let claim = files::claim_for_store(path)?;
    let tightened_at_open = files::tighten_modes(path)?;
    let setup = ConnectionSetup {
        path: path.to_path_buf(),
        synchronous: options.synchronous,
        busy_timeout: options.busy_timeout,
        access: Access::ReadWrite,
    };
    let mut first = setup
        .establish()
        .map_err(|e| classify::about_file(e, path))?;
    let applied_at_open =
        migrations::run_pending(&mut first, path).map_err(|e| classify::about_file(e, path))?;
    let db = Database::open(setup, first, options.pool_size)?;
    Ok((db, applied_at_open, tightened_at_open, claim))
}

/// Opens the SQLite database at `path` for reading only: creates, migrates
/// and changes nothing; see [`StoreOptions::read_only`].
fn open_sqlite_read_only(
    path: &Path,
    options: &StoreOptions,
) -> Result<(Database, Vec<String>, Vec<TightenedFile>, files::OpenClaim)> {
    if let Err(error) = std::fs::symlink_metadata(path) {
        return Err(Error::io(path, error));
    }
    let claim = files::claim_for_store(path)?;
    // No log, or an empty one (as an open that failed on a full disk
    // leaves it): the database file alone holds every committed write.
    let log_empty = std::fs::metadata(files::sidecar(path, "-wal"))
        .map(|metadata| metadata.len() == 0)
        .unwrap_or(true);
    let no_sidecars = !files::SIDECAR_SUFFIXES
        .iter()
        .any(|suffix| files::sidecar(path, suffix).exists());
    let mut setup = ConnectionSetup {
        path: path.to_path_buf(),
        synchronous: options.synchronous,
        busy_timeout: options.busy_timeout,
        access: Access::ReadOnly { tidy: no_sidecars },
    };
    // The first read opens the log's index (`-shm`), creating it if need
    // be; where that fails (the folder cannot take it, or what a failed
    // open left is not an index) and the log is empty, read the file as
    // it stands.
    let mut first = match setup.establish_and_read() {
        Ok(conn) => conn,
        Err(_) if log_empty => {
            setup.access = Access::Immutable;
            setup
                .establish_and_read()
                .map_err(|e| classify::about_file(e, path))?
        }
        Err(error) => return Err(classify::about_file(error, path)),
    };
    let state = migrations::inspect_read_only(&mut first, path)
        .map_err(|e| classify::about_file(e, path))?;
    if !state.marked || !state.pending.is_empty() {
        return Err(Error::NeedsMigration {
            path: path.to_path_buf(),
            pending: state.pending.len(),
        });
    }
    let db = Database::open(setup, first, options.pool_size)?;
    Ok((db, Vec::new(), Vec::new(), claim))
}

/// Connects to the PostgreSQL database at `url` and migrates it.
#[cfg(feature = "postgres")]
fn open_postgres(url: &str, options: &StoreOptions) -> Result<(Database, Vec<String>)> {
    use crate::db::postgres::{connection::PgSetup, migrations as pg_migrations};
    let setup = PgSetup::new(url, options.busy_timeout);
    let mut first = setup.establish()?;
    let applied = pg_migrations::run_pending(&mut first, setup.redacted())?;
    drop(first);
    Ok((Database::open_postgres(setup, options.pool_size)?, applied))
}

/// Without the `postgres` feature, a URL is refused.
#[cfg(not(feature = "postgres"))]
fn open_postgres(_url: &str, _options: &StoreOptions) -> Result<(Database, Vec<String>)> {
    Err(Error::PostgresNotBuilt)
}

impl Drop for Store {
    /// A store dropped without [`Store::close`] closes the same way; the
    /// report is logged instead of returned.
    fn drop(&mut self) {
        if !self.db.is_open() {
            return;
        }
        match self.shutdown() {
            Ok(report) if report.checkpoint_complete => {}
            Ok(report) => tracing::warn!(?report, "store dropped; final checkpoint incomplete"),
            Err(error) => {
                tracing::warn!(error = %error.report(), "store dropped; closing it failed");
            }
        }
    }
}

/// Starts the thread that keeps `watch` current: the key-change listener on
/// PostgreSQL, the watcher on SQLite.
fn start_watcher(db: &Database, watch: &Arc<KeyChangeWatch>) -> Result<WatchThread> {
    #[cfg(feature = "postgres")]
    if let Some(setup) = db.postgres_setup() {
        return crate::db::postgres::listener::start(setup.clone(), watch);
    }
    match db.sqlite_setup() {
        Some(setup) => crate::db::sqlite::watcher::start(setup, watch),
        None => Err(Error::PostgresNotBuilt),
    }
}
