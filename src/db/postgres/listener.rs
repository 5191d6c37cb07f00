//! The key-change listener: keeps a store's [`KeyChangeWatch`] current
//! on PostgreSQL, for resolving in notified mode.
//!
//! A thread of its own holds one connection that `LISTEN`s on
//! `keytally_key_changes` (a trigger notifies it with the new count on
//! every committed change to a key or secret), polls it every
//! [`POLL`], and reads the count itself every [`PROBE`], which also proves
//! the connection alive. The count is trusted only while its last
//! successful read is younger than
//! [`STALE_AFTER`](crate::db::key_changes::STALE_AFTER). A listener whose
//! connection fails stops being trusted the moment it sees the failure (at
//! its next poll, within [`POLL`]); one whose connection hangs, within
//! that time. Resolves then ask the database (strict mode) until the
//! listener has reconnected and read the count again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{PgConnection, RunQueryDsl};

use crate::db::key_changes::{Count, KeyChangeWatch, WatchThread, COUNT_SQL};
use crate::db::postgres::connection::PgSetup;
use crate::error::{Error, Result};

/// The channel the key-change trigger notifies.
pub(crate) const CHANNEL: &str = "keytally_key_changes";

/// How often the listener looks for notifications.
pub const POLL: Duration = Duration::from_millis(5);

/// How often the listener reads the count itself.
pub const PROBE: Duration = Duration::from_millis(50);

/// Starts the listener thread on its own connection to `setup`'s database,
/// keeping `watch`. The first count is read before this returns, so
/// resolves can trust it at once.
pub(crate) fn start(setup: PgSetup, watch: &Arc<KeyChangeWatch>) -> Result<WatchThread> {
    let mut conn = listen(&setup, watch)?;
    let shared = Arc::clone(watch);
    let shown_as = setup.redacted().to_owned();
    let thread = std::thread::Builder::new()
        .name("keytally-listener".to_owned())
        .spawn(move || {
            loop {
                if let Err(error) = serve(&mut conn, &shared) {
                    shared.distrust();
                    tracing::warn!(
                        error = %error.report(),
                        "key-change listener lost its connection; resolves ask the database until it is back"
                    );
                }
                if shared.stopping() {
                    return;
                }
                // Reconnect, pausing between tries.
                conn = loop {
                    std::thread::sleep(PROBE);
                    if shared.stopping() {
                        return;
                    }
                    match listen(&setup, &shared) {
                        Ok(conn) => break conn,
                        Err(error) => tracing::debug!(
                            error = %error.report(),
                            "key-change listener cannot reconnect yet"
                        ),
                    }
                };
            }
        })
        .map_err(|source| Error::Io {
            path: shown_as.into(),
            source,
        })?;
    Ok(WatchThread::new(Arc::clone(watch), thread))
}

/// Opens the listening connection and reads the count once.
fn listen(setup: &PgSetup, watch: &KeyChangeWatch) -> Result<PgConnection> {
    let mut conn = setup.establish()?;
    conn.batch_execute(&format!(
        "SET application_name = 'keytally-listener'; SET statement_timeout = 1000; \
         LISTEN {CHANNEL}"
    ))?;
    probe(&mut conn, watch)?;
    Ok(conn)
}

/// Reads the count; on success the watch is fresh as of the read's start.
fn probe(conn: &mut PgConnection, watch: &KeyChangeWatch) -> Result<()> {
    let began = watch.now();
    let count: Count = diesel::sql_query(COUNT_SQL).get_result(conn)?;
    watch.read(began, count.value);
    Ok(())
}

/// Polls for notifications and probes, until an error or the stop.
fn serve(conn: &mut PgConnection, watch: &KeyChangeWatch) -> Result<()> {
    let mut last_probe = Instant::now();
    while !watch.stopping() {
        for notification in conn.notifications_iter() {
            let notification = notification?;
            if let Ok(count) = notification.payload.parse::<i64>() {
                watch.learn(count);
            }
        }
        if last_probe.elapsed() >= PROBE {
            last_probe = Instant::now();
            probe(conn, watch)?;
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}
