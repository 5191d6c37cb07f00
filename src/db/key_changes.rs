//! [`KeyChangeWatch`]: what a store knows of the database's count of key
//! changes without asking, for resolving in notified mode
//! ([`crate::ResolveMode::Notified`]).
//!
//! A thread of the store keeps it current: on PostgreSQL the listener
//! (`postgres/listener.rs`, `LISTEN`/`NOTIFY` and a read every 50 ms), on
//! SQLite the watcher (`sqlite/watcher.rs`, a local read every
//! [`SQLITE_POLL`]). The count is trusted only while the last successful
//! read began less than [`STALE_AFTER`] ago, and only if it began after
//! this process's own last key change: so a change made by this process is
//! seen by its next resolve, and one made by another process within the
//! watcher's delay (at most [`STALE_AFTER`]).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The count of key changes, as the watcher threads read it.
pub(crate) const COUNT_SQL: &str = "SELECT next AS value FROM sequences WHERE name = 'key_changes'";

/// A row of [`COUNT_SQL`].
#[derive(diesel::QueryableByName)]
pub(crate) struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) value: i64,
}

/// How old the last successful read may be before the count is no longer
/// trusted.
pub const STALE_AFTER: Duration = Duration::from_millis(100);

/// How often the SQLite watcher reads the count.
pub const SQLITE_POLL: Duration = Duration::from_millis(5);

/// The count of key changes as last read or heard, shared between the
/// thread that keeps it and the resolves.
#[derive(Debug)]
pub(crate) struct KeyChangeWatch {
    started: Instant,
    /// The highest `key_changes` count read or heard.
    known: AtomicI64,
    /// When the last successful read began, in microseconds since
    /// `started`; 0 before the first.
    fresh_at: AtomicU64,
    /// When this process last committed a key change, in microseconds since
    /// `started`; a read must begin after it to be trusted.
    changed_here_at: AtomicU64,
    stopping: AtomicBool,
}

impl KeyChangeWatch {
    pub(crate) fn new() -> Arc<KeyChangeWatch> {
        Arc::new(KeyChangeWatch {
            started: Instant::now(),
            known: AtomicI64::new(0),
            fresh_at: AtomicU64::new(0),
            changed_here_at: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        })
    }

    /// The count of key changes, if it was read less than [`STALE_AFTER`]
    /// ago and after this process's last key change; `None` tells the
    /// caller to ask the database.
    pub(crate) fn fresh_count(&self) -> Option<i64> {
        let fresh_at = self.fresh_at.load(Ordering::Acquire);
        if fresh_at == 0 || fresh_at <= self.changed_here_at.load(Ordering::Acquire) {
            return None;
        }
        let age = self.now().saturating_sub(fresh_at);
        (age < STALE_AFTER.as_micros() as u64).then(|| self.known.load(Ordering::Acquire))
    }

    /// Microseconds since the watch started (at least 1): what a read
    /// records as its start.
    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// A count heard of (a notification); freshness is unchanged.
    pub(crate) fn learn(&self, count: i64) {
        self.known.fetch_max(count, Ordering::AcqRel);
    }

    /// A read of the count that began at `began` (from [`Self::now`])
    /// returned `count`.
    pub(crate) fn read(&self, began: u64, count: i64) {
        self.learn(count);
        self.fresh_at.fetch_max(began, Ordering::AcqRel);
    }

    /// This process committed a change to a key or a secret: the count it
    /// knows is not trusted until a read that began after now.
    pub(crate) fn changed_here(&self) {
        self.distrust();
    }

    /// The thread that keeps the count lost its source (the listener's
    /// connection): the count is not trusted until a read that began after
    /// now, so resolves ask the database from this moment on.
    pub(crate) fn distrust(&self) {
        let now = self.now();
        self.changed_here_at.fetch_max(now, Ordering::AcqRel);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// The thread that keeps a [`KeyChangeWatch`], stopped and joined on drop.
#[derive(Debug)]
pub(crate) struct WatchThread {
    watch: Arc<KeyChangeWatch>,
    thread: Option<JoinHandle<()>>,
}

impl WatchThread {
    pub(crate) fn new(watch: Arc<KeyChangeWatch>, thread: JoinHandle<()>) -> WatchThread {
        WatchThread {
            watch,
            thread: Some(thread),
        }
    }

    /// Stops the thread and waits for it (at most one read).
    pub(crate) fn stop(&mut self) {
        self.watch.stopping.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the key-change watcher thread panicked");
            }
        }
    }
}

impl Drop for WatchThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_trusted_only_when_read_recently_and_after_a_local_change() {
        let watch = KeyChangeWatch::new();
        assert_eq!(watch.fresh_count(), None, "never read");
        let began = watch.now();
        std::thread::sleep(Duration::from_millis(1));
        watch.read(began, 7);
        assert_eq!(watch.fresh_count(), Some(7));
        // A read that began before a local change does not count after it.
        let before_change = watch.now();
        std::thread::sleep(Duration::from_millis(1));
        watch.changed_here();
        watch.read(before_change, 7);
        assert_eq!(watch.fresh_count(), None);
        std::thread::sleep(Duration::from_millis(1));
        let after_change = watch.now();
        watch.read(after_change, 8);
        assert_eq!(watch.fresh_count(), Some(8));
        // Too old.
        std::thread::sleep(STALE_AFTER);
        assert_eq!(watch.fresh_count(), None);
    }
}
