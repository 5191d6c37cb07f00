//! Test support for applications built on keytally (the `testing` feature):
//! rstest fixtures that give each test its own migrated store in a temporary
//! folder, removed when the test ends.
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

use rstest::fixture;
use tempfile::TempDir;

use crate::db::database::CloseReport;
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
        Ok(TestStore { store, folder })
    }

    /// The temporary folder holding the database.
    pub fn folder(&self) -> &Path {
        self.folder.path()
    }

    /// Splits into the store and its folder, for tests that need to own the
    /// store (to share it in an `Arc`, for instance). Keep the folder alive
    /// as long as the store.
    pub fn into_parts(self) -> (Store, TempDir) {
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
    panic!("keytally test fixture could not be set up: {error}")
}
