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
use crate::model::event::NewEvent;
use crate::repositories::event_rows::ValidEvent;
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
    /// The writer thread has ended (normally, or by a panic): tickets not
    /// settled by then never will be.
    writer_gone: bool,
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
    sender: Option<SyncSender<(u64, ValidEvent<'static>)>>,
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
                .spawn(move || {
                    write_batches(
                        |batch: &[ValidEvent<'static>]| {
                            store.events().record_valid(batch).map(|_| ())
                        },
                        &state,
                        &receiver,
                        options,
                    );
                })
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
            .map_err(|refused| refused.at(0))?
            .into_owned();
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
    /// [`Error::BatchFailed`] with the reason the batch was not committed,
    /// also when the writer thread ended before it (it panicked).
    pub fn wait(&self, ticket: Ticket) -> Result<()> {
        self.state.outcome(ticket.0)
    }

    /// Waits until everything submitted so far is committed or has failed.
    ///
    /// # Errors
    ///
    /// [`Error::BatchFailed`] if any batch failed since the sink started.
    pub fn flush(&self) -> Result<()> {
        let last = self.submitted.load(Ordering::Acquire);
        let progress = self.state.settled_through(last);
        if progress.settled_through < last {
            return Err(writer_gone());
        }
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
        let submitted = self.submitted.load(Ordering::Acquire);
        let unsettled = submitted.saturating_sub(progress.settled_through);
        if progress.report.failed > 0 || unsettled > 0 {
            return Err(Error::BatchFailed {
                message: format!(
                    "{} events committed, {} not committed",
                    progress.report.committed,
                    progress.report.failed + unsettled
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

impl State {
    /// Waits until every ticket up to `last` has been committed or failed,
    /// or the writer is gone.
    fn settled_through(&self, last: u64) -> std::sync::MutexGuard<'_, Progress> {
        self.settled
            .wait_while(
                self.progress.lock().unwrap_or_else(PoisonError::into_inner),
                |progress| progress.settled_through < last && !progress.writer_gone,
            )
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for `ticket`'s fate.
    fn outcome(&self, ticket: u64) -> Result<()> {
        let progress = self.settled_through(ticket);
        if progress.settled_through < ticket {
            return Err(writer_gone());
        }
        match progress
            .failures
            .iter()
            .find(|range| (range.first..=range.last).contains(&ticket))
        {
            Some(range) => Err(Error::BatchFailed {
                message: range.message.clone(),
            }),
            None => Ok(()),
        }
    }
}

fn writer_gone() -> Error {
    Error::BatchFailed {
        message: "the sink's writer thread stopped before committing it; the event was not \
                  recorded"
            .to_owned(),
    }
}

/// Marks the writer gone when dropped: when the writer returns, and when it
/// unwinds from a panic, so that nobody waits for it forever.
struct WriterExit<'a>(&'a State);

impl Drop for WriterExit<'_> {
    fn drop(&mut self) {
        self.0
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .writer_gone = true;
        self.0.settled.notify_all();
    }
}

/// The writer thread: commits queued events in batches with `commit`.
fn write_batches<T>(
    commit: impl Fn(&[T]) -> Result<()>,
    state: &State,
    receiver: &Receiver<(u64, T)>,
    options: SinkOptions,
) {
    let _exit = WriterExit(state);
    let mut batch: Vec<T> = Vec::with_capacity(options.batch_size.min(options.capacity));
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
        let outcome = commit(&batch);
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
                tracing::warn!(error = %error.report(), events = count, "event batch could not be committed");
                progress.report.failed += count;
                progress.failures.push_back(FailedRange {
                    first: first_ticket,
                    last: last_ticket,
                    message: error.report(),
                });
            }
        }
        progress.settled_through = last_ticket;
        drop(progress);
        state.settled.notify_all();
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer's panic reaches the waiters as an error instead of a wait
    /// without end: a real thread whose commit panics.
    #[test]
    #[expect(clippy::panic, reason = "the test needs a writer that panics")]
    fn a_panicking_writer_fails_its_tickets_instead_of_hanging() {
        let state = Arc::new(State {
            progress: Mutex::new(Progress::default()),
            settled: Condvar::new(),
        });
        let (sender, receiver) = mpsc::sync_channel::<(u64, u32)>(4);
        let writer = {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                write_batches(
                    |_: &[u32]| -> Result<()> { panic!("commit failed in a way nobody planned") },
                    &state,
                    &receiver,
                    SinkOptions::default(),
                );
            })
        };
        assert!(sender.send((1, 7)).is_ok());
        let (done, outcome) = mpsc::channel();
        let waiter = {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                let _ = done.send(state.outcome(1));
            })
        };
        // A bound on the wait, so that a regression fails instead of hanging.
        let outcome = outcome.recv_timeout(Duration::from_secs(30));
        assert!(
            matches!(outcome, Ok(Err(Error::BatchFailed { .. }))),
            "{outcome:?}"
        );
        assert!(writer.join().is_err(), "the writer did not panic");
        assert!(waiter.join().is_ok());
    }
}
