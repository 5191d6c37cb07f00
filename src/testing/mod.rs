//! Test support for applications built on keytally (the `testing` feature):
//! rstest fixtures that give each test its own migrated store, in a
//! temporary folder removed when the test ends, or (with the `postgres`
//! feature) in a fresh database of a real PostgreSQL server, so an
//! application can run the same tests on both backends:
//!
//! ```no_run
//! use keytally::testing::store_on;
//! use keytally::{Backend, NewKey};
//! use rstest::rstest;
//!
//! #[rstest]
//! fn keys_resolve(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
//!     let store = store_on(backend);
//!     let created = store.keys().create(&NewKey::client("test")).unwrap();
//!     assert!(store.keys().resolve(created.secret.expose()).unwrap().is_ok());
//! }
//! # fn main() {}
//! ```
//!
//! ```
//! use keytally::testing::{store, TestStore};
//! use rstest::rstest;
//!
//! #[rstest]
//! fn my_handler_records_usage(store: TestStore) -> keytally::Result<()> {
//!     let status = store.status()?;
//!     assert_eq!(status.journal_mode, "wal");
//!     Ok(())
//! }
//! # fn main() {}
//! ```

use std::ops::Deref;
use std::path::{Path, PathBuf};

#[cfg(feature = "postgres")]
pub mod postgres;

use rstest::fixture;
use tempfile::TempDir;

use crate::db::database::{Backend, CloseReport};
use crate::error::{Error, Result};
use crate::store::options::StoreOptions;
use crate::store::Store;

/// A migrated store in a temporary folder that is removed on drop.
///
/// It dereferences to [`Store`].
#[derive(Debug)]
pub struct TestStore {
    // Declared before `folder` so the store closes before the folder goes.
    store: Store,
    folder: TempDir,
    /// The PostgreSQL database made for this store, dropped after it.
    database: Option<TestDatabase>,
}

/// A database made on the test server, dropped when this is.
#[derive(Debug)]
struct TestDatabase {
    url: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        #[cfg(feature = "postgres")]
        if let Err(error) = postgres::drop_database_url(&self.url) {
            tracing::warn!(%error, "could not drop a test database");
        }
    }
}

impl TestStore {
    /// Creates a folder and opens a store with default options in it.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the folder cannot be created, or whatever
    /// [`Store::open`] returns.
    pub fn new() -> Result<TestStore> {
        Self::with_options(|options| options)
    }

    /// Like [`TestStore::new`], letting `configure` change the options.
    ///
    /// # Errors
    ///
    /// As [`TestStore::new`].
    pub fn with_options(configure: impl FnOnce(StoreOptions) -> StoreOptions) -> Result<TestStore> {
        let folder = temp_folder()?;
        let store = configure(StoreOptions::new(folder.path().join("keytally.db"))).open()?;
        Ok(TestStore {
            store,
            folder,
            database: None,
        })
    }

    /// A store with default options on `backend`: SQLite in a temporary
    /// folder, or PostgreSQL in a fresh database (see [`postgres`]).
    ///
    /// # Errors
    ///
    /// As [`TestStore::with_options_on`].
    pub fn on(backend: Backend) -> Result<TestStore> {
        Self::with_options_on(backend, |options| options)
    }

    /// Like [`TestStore::on`], letting `configure` change the options.
    ///
    /// # Errors
    ///
    /// As [`TestStore::new`]; on PostgreSQL, [`Error::Open`] if no server
    /// could be started or no database made, and
    /// [`Error::PostgresNotBuilt`] without the `postgres` feature.
    pub fn with_options_on(
        backend: Backend,
        configure: impl FnOnce(StoreOptions) -> StoreOptions,
    ) -> Result<TestStore> {
        match backend {
            Backend::Sqlite => Self::with_options(configure),
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                let folder = temp_folder()?;
                let url = postgres::fresh_database_url()?;
                let store = configure(StoreOptions::new(&url)).open()?;
                Ok(TestStore {
                    store,
                    folder,
                    database: Some(TestDatabase { url }),
                })
            }
            #[cfg(not(feature = "postgres"))]
            Backend::Postgres => Err(Error::PostgresNotBuilt),
        }
    }

    /// The URL of the store's PostgreSQL database (with no password: the
    /// test server trusts local connections), or `None` on SQLite.
    pub fn database_url(&self) -> Option<&str> {
        self.database.as_ref().map(|database| database.url.as_str())
    }

    /// The temporary folder holding the database.
    pub fn folder(&self) -> &Path {
        self.folder.path()
    }

    /// Splits into the store and its folder, for tests that need to own the
    /// store (to share it in an `Arc`, for instance). Keep the folder alive
    /// as long as the store.
    /// A PostgreSQL store's database is then kept until the test server
    /// stops.
    pub fn into_parts(self) -> (Store, TempDir) {
        std::mem::forget(self.database);
        (self.store, self.folder)
    }

    /// Closes the store (with its final checkpoint) and hands back the folder,
    /// so a test can inspect or reopen the files.
    ///
    /// # Errors
    ///
    /// As [`Store::close`].
    pub fn close(self) -> Result<(CloseReport, TempDir, PathBuf)> {
        let path = self.store.path().to_path_buf();
        // The database, if any, is dropped after the store has closed.
        let report = self.store.close()?;
        Ok((report, self.folder, path))
    }
}

impl Deref for TestStore {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

/// A new temporary folder.
///
/// # Errors
///
/// [`Error::Io`] if it cannot be created.
pub fn temp_folder() -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix("keytally-test-")
        .tempdir()
        .map_err(|source| Error::Io {
            path: std::env::temp_dir(),
            source,
        })
}

/// rstest fixture: a migrated store in its own temporary folder.
#[fixture]
pub fn store() -> TestStore {
    match TestStore::new() {
        Ok(store) => store,
        // A fixture cannot return an error; a test without its store cannot
        // run, and the message says why.
        Err(error) => panic_in_fixture(&error),
    }
}

/// A migrated store on `backend`, for tests parametrised over both:
/// `#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend`.
pub fn store_on(backend: Backend) -> TestStore {
    match TestStore::on(backend) {
        Ok(store) => store,
        Err(error) => panic_in_fixture(&error),
    }
}

/// rstest fixture: a migrated store in a fresh database of a real
/// PostgreSQL server (see [`postgres`]).
#[cfg(feature = "postgres")]
#[fixture]
pub fn postgres_store() -> TestStore {
    store_on(Backend::Postgres)
}

/// rstest fixture: an empty temporary folder.
#[fixture]
pub fn folder() -> TempDir {
    match temp_folder() {
        Ok(folder) => folder,
        Err(error) => panic_in_fixture(&error),
    }
}

#[expect(clippy::panic, reason = "fixtures cannot return errors to the test")]
fn panic_in_fixture(error: &Error) -> ! {
    panic!(
        "keytally test fixture could not be set up: {}",
        error.report()
    )
}
