//! The key-change watcher: keeps a store's [`KeyChangeWatch`] current on
//! SQLite, for resolving in notified mode. SQLite has no notifications, but
//! reading the count is a local read of one row: a thread of its own reads
//! it every [`SQLITE_POLL`] on a connection of its own, so that resolves
//! answered from memory need not. If reads fail (the database is locked for
//! a schema change, the disk is gone), the count goes stale within
//! [`crate::db::key_changes::STALE_AFTER`] and resolves ask the database
//! again.

use std::sync::Arc;

use diesel::{RunQueryDsl, SqliteConnection};

use crate::db::key_changes::{Count, KeyChangeWatch, WatchThread, COUNT_SQL, SQLITE_POLL};
use crate::db::sqlite::connection::ConnectionSetup;
use crate::error::{Error, Result};

/// Starts the watcher thread on its own connection, keeping `watch`. The
/// first count is read before this returns, so resolves can trust it at
/// once.
pub(crate) fn start(setup: &ConnectionSetup, watch: &Arc<KeyChangeWatch>) -> Result<WatchThread> {
    let mut conn = setup.establish()?;
    read(&mut conn, watch)?;
    let shared = Arc::clone(watch);
    let thread = std::thread::Builder::new()
        .name("keytally-watcher".to_owned())
        .spawn(move || {
            while !shared.stopping() {
                std::thread::sleep(SQLITE_POLL);
                if let Err(error) = read(&mut conn, &shared) {
                    tracing::debug!(error = %error.report(), "key-change count not read");
                }
            }
        })
        .map_err(|source| Error::Io {
            path: setup.path.clone(),
            source,
        })?;
    Ok(WatchThread::new(Arc::clone(watch), thread))
}

/// Reads the count; on success the watch is fresh as of the read's start.
fn read(conn: &mut SqliteConnection, watch: &KeyChangeWatch) -> Result<()> {
    let began = watch.now();
    let count: Count = diesel::sql_query(COUNT_SQL).get_result(conn)?;
    watch.read(began, count.value);
    Ok(())
}
