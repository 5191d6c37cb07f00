//! [`KeyChangeListener`]: a store's ear on PostgreSQL's `key_changes`
//! count, for resolving in notified mode.
//!
//! A thread of its own holds one connection that `LISTEN`s on
//! `keytally_key_changes` (a trigger notifies it with the new count on
//! every committed change to a key or secret), polls it every
//! [`POLL`], and reads the count itself every [`PROBE`], which also proves
//! the connection alive. The count it knows is trusted only while its last
//! successful read is younger than [`STALE_AFTER`]: a listener whose
//! connection died or hangs stops being trusted within that time, and
//! resolves fall back to asking the database (strict mode) until it is
//! back.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use crate::db::postgres::connection::PgSetup;
use crate::error::{Error, Result};

/// The channel the key-change trigger notifies.
pub(crate) const CHANNEL: &str = "keytally_key_changes";

/// How often the listener looks for notifications.
pub const POLL: Duration = Duration::from_millis(5);

/// How often the listener reads the count itself.
pub const PROBE: Duration = Duration::from_millis(50);

/// How old the listener's last successful read may be before its count is
/// no longer trusted.
pub const STALE_AFTER: Duration = Duration::from_millis(100);

/// What the listener knows, shared with the resolves.
#[derive(Debug)]
pub(crate) struct KeyChangeListener {
    started: Instant,
    /// The highest `key_changes` count heard or read.
    known: AtomicI64,
    /// When the last successful read began, in microseconds since
    /// `started`; 0 before the first.
    fresh_at: AtomicU64,
    stopping: AtomicBool,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

impl KeyChangeListener {
    /// The count of key changes, if the listener knew it less than
    /// [`STALE_AFTER`] ago; `None` tells the caller to ask the database.
    pub(crate) fn fresh_count(&self) -> Option<i64> {
        let fresh_at = self.fresh_at.load(Ordering::Acquire);
        if fresh_at == 0 {
            return None;
        }
        let age = self.elapsed_micros().saturating_sub(fresh_at);
        (age < STALE_AFTER.as_micros() as u64).then(|| self.known.load(Ordering::Acquire))
    }

    fn elapsed_micros(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn learn(&self, count: i64) {
        self.known.fetch_max(count, Ordering::AcqRel);
    }

    /// Starts the listener thread on its own connection to `setup`'s
    /// database. The first count is read before this returns, so resolves
    /// can trust it at once.
    pub(crate) fn start(setup: PgSetup) -> Result<(Arc<KeyChangeListener>, ListenerThread)> {
        let listener = Arc::new(KeyChangeListener {
            started: Instant::now(),
            known: AtomicI64::new(0),
            fresh_at: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let mut conn = listen(&setup, &listener)?;
        let shared = Arc::clone(&listener);
        let shown_as = setup.redacted().to_owned();
        let thread = std::thread::Builder::new()
            .name("keytally-listener".to_owned())
            .spawn(move || {
                loop {
                    if let Err(error) = serve(&mut conn, &shared) {
                        tracing::warn!(
                            error = %error.report(),
                            "key-change listener lost its connection; resolves ask the database until it is back"
                        );
                    }
                    if shared.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    // Reconnect, pausing between tries.
                    conn = loop {
                        std::thread::sleep(PROBE);
                        if shared.stopping.load(Ordering::Acquire) {
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
        Ok((
            Arc::clone(&listener),
            ListenerThread {
                listener,
                thread: Some(thread),
            },
        ))
    }
}

/// Opens the listening connection and reads the count once.
fn listen(setup: &PgSetup, listener: &KeyChangeListener) -> Result<PgConnection> {
    let mut conn = setup.establish()?;
    conn.batch_execute(&format!(
        "SET application_name = 'keytally-listener'; SET statement_timeout = 1000; \
         LISTEN {CHANNEL}"
    ))?;
    probe(&mut conn, listener)?;
    Ok(conn)
}

/// Reads the count; on success the listener is fresh as of the read's
/// start.
fn probe(conn: &mut PgConnection, listener: &KeyChangeListener) -> Result<()> {
    let started = listener.elapsed_micros().max(1);
    let count: Count =
        diesel::sql_query("SELECT next AS value FROM sequences WHERE name = 'key_changes'")
            .get_result(conn)?;
    listener.learn(count.value);
    listener.fresh_at.fetch_max(started, Ordering::AcqRel);
    Ok(())
}

/// Polls for notifications and probes, until an error or the stop.
fn serve(conn: &mut PgConnection, listener: &KeyChangeListener) -> Result<()> {
    let mut last_probe = Instant::now();
    while !listener.stopping.load(Ordering::Acquire) {
        for notification in conn.notifications_iter() {
            let notification = notification?;
            if let Ok(count) = notification.payload.parse::<i64>() {
                listener.learn(count);
            }
        }
        if last_probe.elapsed() >= PROBE {
            last_probe = Instant::now();
            probe(conn, listener)?;
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The listener's thread, stopped and joined on drop.
#[derive(Debug)]
pub(crate) struct ListenerThread {
    listener: Arc<KeyChangeListener>,
    thread: Option<JoinHandle<()>>,
}

impl ListenerThread {
    /// Stops the thread and waits for it (at most one probe).
    pub(crate) fn stop(&mut self) {
        self.listener.stopping.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ListenerThread {
    fn drop(&mut self) {
        self.stop();
    }
}
