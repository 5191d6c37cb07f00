//! The store's maintenance thread: a passive checkpoint every second, the
//! `last_used_at` flush, the log lines of keys reaching their budgets, and
//! the retention sweep.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::db::database::{Backend, Database};
use crate::db::sqlite::checkpoint;
use crate::error::{Error, Result};
use crate::model::event::DEFAULT_PRUNE_BATCH;
use crate::model::time::{Timestamp, HOUR_MS};
use crate::repositories::budgets;
use crate::repositories::events;
use crate::repositories::keys::KeyMemory;
use crate::repositories::rollups;
use crate::store::options::Retention;

/// How often the maintenance thread checkpoints the write-ahead log.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);

/// The running maintenance thread, stopped (after one last flush) by
/// [`Maintenance::stop`].
#[derive(Debug)]
pub(crate) struct Maintenance {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Signal {
    stopping: Mutex<bool>,
    wake: Condvar,
}

impl Signal {
    fn stopping(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Maintenance {
    /// Starts the thread. Every second it runs a passive checkpoint, so that
    /// committing writers rarely have to (their automatic checkpoint is only
    /// a backstop, see `connection.rs`); every `flush_interval` it writes the
    /// `last_used_at` times noted by resolves; every sweep interval it
    /// deletes what the retention policy no longer keeps.
    pub(crate) fn start(
        db: Database,
        keys: Arc<KeyMemory>,
        flush_interval: Duration,
        retention: Retention,
    ) -> Result<Maintenance> {
        let signal = Arc::new(Signal::default());
        let thread = {
            let signal = Arc::clone(&signal);
            std::thread::Builder::new()
                .name("keytally-maintenance".to_owned())
                .spawn(move || run(&db, &keys, &signal, flush_interval, &retention))
                .map_err(|source| Error::Io {
                    path: PathBuf::from("(thread)"),
                    source,
                })?
        };
        Ok(Maintenance {
            signal,
            thread: Some(thread),
        })
    }

    /// Flushes `last_used_at` one last time and stops the thread.
    pub(crate) fn stop(&mut self) {
        *self
            .signal
            .stopping
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.signal.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the maintenance thread panicked");
            }
        }
    }
}

fn run(
    db: &Database,
    keys: &KeyMemory,
    signal: &Signal,
    flush_interval: Duration,
    retention: &Retention,
) {
    let mut last_flush = Instant::now();
    let mut last_sweep = Instant::now();
    loop {
        let stopping = {
            let guard = signal
                .stopping
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let tick = CHECKPOINT_INTERVAL.min(flush_interval);
            let (guard, _) = signal
                .wake
                .wait_timeout_while(guard, tick, |stopping| !*stopping)
                .unwrap_or_else(PoisonError::into_inner);
            *guard
        };
        if stopping || last_flush.elapsed() >= flush_interval {
            last_flush = Instant::now();
            if let Err(error) = keys.last_used.flush(db) {
                tracing::warn!(error = %error.report(), "could not write last_used_at; will retry");
            }
        }
        if let Err(error) = budgets::log_reports(db) {
            tracing::warn!(error = %error.report(), "could not log the budget reports; will retry");
        }
        if stopping {
            break;
        }
        if last_sweep.elapsed() >= retention.sweep_interval {
            last_sweep = Instant::now();
            if let Err(error) = sweep(db, signal, retention) {
                tracing::warn!(error = %error.report(), "retention sweep failed; will retry");
            }
        }
        if db.backend() != Backend::Sqlite {
            continue;
        }
        let checkpointed =
            checkpoint::background_checkpoint(|| db.sqlite_connection("checkpoint"), db.gate());
        if let Err(error) = checkpointed {
            tracing::debug!(error = %error.report(), "background checkpoint did not run");
        }
    }
}

/// Deletes what the retention policy no longer keeps, 1,000 rows per write
/// transaction, stopping early when the store starts closing.
fn sweep(db: &Database, signal: &Signal, retention: &Retention) -> Result<()> {
    let batch = DEFAULT_PRUNE_BATCH;
    let cutoff = |age: Duration| {
        Timestamp::now().plus_millis(-i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
    };
    if let Some(age) = retention.raw_events {
        let cutoff = cutoff(age);
        let mut deleted = 0;
        loop {
            let n = db.write(|conn| events::delete_before(conn, cutoff, batch))?;
            deleted += n;
            if n < batch as usize || signal.stopping() {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, %cutoff, "retention: deleted raw events");
        }
    }
    if let Some(age) = retention.rollups {
        let cutoff_hour = cutoff(age).as_millis().div_euclid(HOUR_MS);
        loop {
            let n = db.write(|conn| rollups::delete_before(conn, cutoff_hour, batch))?;
            if n == 0 || signal.stopping() {
                break;
            }
        }
    }
    Ok(())
}
