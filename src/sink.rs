//! [`EventSink`]: batched ingestion of events from many threads, bounded in
//! memory, with every event's fate reported.
//!
//! Producers call [`EventSink::submit`], which validates the event at once
//! (a bad event never reaches a batch) and queues it; when the queue is full
//! it blocks, so memory stays bounded. One writer thread commits the queue in
//! batches, when a batch is full or `max_delay` has passed since its first
//! event. Each submission returns a [`Ticket`]; [`EventSink::wait`] says
//! whether that event was committed or its batch failed. Nothing is dropped
//! silently.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::events::{at_index, NewEvent, PreparedEvent};
use crate::store::Store;

/// How an [`EventSink`] batches.
#[derive(Debug, Clone, Copy)]
pub struct SinkOptions {
    /// Events queued at most, waiting for the writer; a full queue makes
    /// [`EventSink::submit`] wait (default 10,000).
    pub capacity: usize,
    /// Events per transaction at most (default 1,000).
    pub batch_size: usize,
    /// The longest an event waits for its batch to fill (default 50 ms).
    pub max_delay: Duration,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            capacity: 10_000,
            batch_size: 1_000,
            max_delay: Duration::from_millis(50),
        }
    }
}

/// A submitted event's place in the sink: submission order, from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Ticket(u64);

impl Ticket {
    /// The submission number.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// What a closed sink did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct SinkReport {
    /// Events committed.
    pub committed: u64,
    /// Events in batches that failed.
    pub failed: u64,
    /// Transactions committed.
    pub batches: u64,
}

/// A batch that could not be committed.
#[derive(Debug, Clone)]
struct FailedRange {
    first: u64,
    last: u64,
    message: String,
}

#[derive(Default)]
struct Progress {
    /// Every ticket up to this one has been committed or has failed.
    settled_through: u64,
    failures: VecDeque<FailedRange>,
    report: SinkReport,
}

struct State {
    progress: Mutex<Progress>,
    settled: Condvar,
}

/// Batched, bounded, reporting event ingestion; see the module docs.
pub struct EventSink {
    store: Arc<Store>,
    sender: Option<SyncSender<(u64, PreparedEvent)>>,
    /// Held while queueing, so tickets enter the queue in order.
    queue_order: Mutex<()>,
    /// The last ticket queued.
    submitted: AtomicU64,
    state: Arc<State>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

impl EventSink {
    /// Starts a sink writing into `store`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a zero capacity or batch size,
    /// [`Error::Io`] if the writer thread cannot start.
    pub fn new(store: Arc<Store>, options: SinkOptions) -> Result<EventSink> {
        if options.capacity == 0 || options.batch_size == 0 {
            return Err(Error::InvalidInput {
                field: "sink options",
                reason: "capacity and batch_size must be at least 1".to_owned(),
            });
        }
        let (sender, receiver) = mpsc::sync_channel(options.capacity);
        let state = Arc::new(State {
            progress: Mutex::new(Progress::default()),
            settled: Condvar::new(),
        });
        let writer = {
            let store = Arc::clone(&store);
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name("keytally-sink".to_owned())
                .spawn(move || write_batches(&store, &state, &receiver, options))
                .map_err(|source| Error::Io {
                    path: "(thread)".into(),
                    source,
                })?
        };
        Ok(EventSink {
            store,
            sender: Some(sender),
            queue_order: Mutex::new(()),
            submitted: AtomicU64::new(0),
            state,
            writer: Some(writer),
        })
    }

    /// Validates `event` and queues it, waiting while the queue is full.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] for a bad event (nothing is queued),
    /// [`Error::Closed`] if the sink is closing, or the store's errors while
    /// resolving the event's key or model.
    pub fn submit(&self, event: &NewEvent) -> Result<Ticket> {
        let prepared = self
            .store
            .events()
            .prepare(event)
            .map_err(|reason| at_index(0, reason))?;
        let sender = self.sender.as_ref().ok_or(Error::Closed)?;
        // Tickets are handed out in queue order, so that "settled through N"
        // covers exactly the first N submissions.
        let _order = self
            .queue_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ticket = self.submitted.load(Ordering::Acquire) + 1;
        sender.send((ticket, prepared)).map_err(|_| Error::Closed)?;
        self.submitted.store(ticket, Ordering::Release);
        Ok(Ticket(ticket))
    }

    /// Waits until the ticket's batch is committed (`Ok`) or has failed.
    ///
    /// # Errors
    ///
    /// [`Error::BatchFailed`] with the reason the batch was not committed.
    pub fn wait(&self, ticket: Ticket) -> Result<()> {
        let progress = self.settled_through(ticket.0);
        match progress
            .failures
            .iter()
            .find(|range| (range.first..=range.last).contains(&ticket.0))
        {
            Some(range) => Err(Error::BatchFailed {
                message: range.message.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Waits until everything submitted so far is committed or has failed.
    ///
    /// # Errors
    ///
    /// [`Error::BatchFailed`] if any batch failed since the sink started.
    pub fn flush(&self) -> Result<()> {
        let last = self.submitted.load(Ordering::Acquire);
        let progress = self.settled_through(last);
        match progress.failures.front() {
            Some(range) => Err(Error::BatchFailed {
                message: format!(
                    "events {} to {} were not committed: {}",
                    range.first, range.last, range.message
                ),
            }),
            None => Ok(()),
        }
    }

    /// Waits until every ticket up to `last` has been committed or failed.
    fn settled_through(&self, last: u64) -> std::sync::MutexGuard<'_, Progress> {
        self.state
            .settled
            .wait_while(
                self.state
                    .progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
                |progress| progress.settled_through < last,
            )
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Events submitted and not yet settled (queued or in the batch being
    /// written).
    pub fn in_flight(&self) -> u64 {
        let next = self.submitted.load(Ordering::Acquire);
        let settled = self
            .state
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .settled_through;
        next.saturating_sub(settled)
    }

    /// Commits everything queued, stops the writer and reports.
    ///
    /// # Errors
    ///
    /// [`Error::BatchFailed`] if any batch failed; the report is then in the
    /// message.
    pub fn close(mut self) -> Result<SinkReport> {
        self.stop();
        let progress = self
            .state
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if progress.report.failed > 0 {
            return Err(Error::BatchFailed {
                message: format!(
                    "{} events committed, {} not committed",
                    progress.report.committed, progress.report.failed
                ),
            });
        }
        Ok(progress.report.clone())
    }

    fn stop(&mut self) {
        // Dropping the sender ends the writer's loop once the queue is empty.
        drop(self.sender.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::warn!("the event sink's writer thread panicked");
            }
        }
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_batches(
    store: &Store,
    state: &State,
    receiver: &Receiver<(u64, PreparedEvent)>,
    options: SinkOptions,
) {
    let mut batch: Vec<PreparedEvent> = Vec::with_capacity(options.batch_size);
    let mut open = true;
    while open {
        // Wait for the first event of a batch, then fill it until it is full
        // or its first event has waited `max_delay`.
        let Ok((first_ticket, event)) = receiver.recv() else {
            break;
        };
        let mut last_ticket = first_ticket;
        batch.push(event);
        let deadline = Instant::now() + options.max_delay;
        while batch.len() < options.batch_size {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok((ticket, event)) => {
                    last_ticket = ticket;
                    batch.push(event);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let outcome = store.events().record_prepared(&batch);
        let mut progress = state
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = batch.len() as u64;
        match outcome {
            Ok(_) => {
                progress.report.committed += count;
                progress.report.batches += 1;
            }
            Err(error) => {
                tracing::warn!(%error, events = count, "event batch could not be committed");
                progress.report.failed += count;
                progress.failures.push_back(FailedRange {
                    first: first_ticket,
                    last: last_ticket,
                    message: error.to_string(),
                });
            }
        }
        progress.settled_through = last_ticket;
        drop(progress);
        state.settled.notify_all();
        batch.clear();
    }
}
