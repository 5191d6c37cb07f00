//! [`EventSink`]: batched ingestion of events from many threads, bounded in
//! memory, with every event's fate reported.
//!
//! Producers call [`EventSink::submit`], which validates the event at once
//! (a bad event never reaches a batch) and queues it; when the queue is full
//! it blocks, so memory stays bounded. An async server calls
//! [`EventSink::try_submit`] instead, which never waits: not for queue space
//! (a full queue is [`Error::SinkFull`]) and not for the database (a key or
//! model it has not seen yet is looked up by the writer). One writer thread
//! commits the queue in batches, when a batch is full or `max_delay` has
//! passed since its first event. Each submission returns a [`Ticket`];
//! [`EventSink::wait`] says whether that event was committed or its batch
//! failed. Nothing is dropped silently.

mod queue;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::event::NewEvent;
use crate::repositories::event_rows::ValidEvent;
use crate::store::Store;
use queue::{write_batches, writer_gone, State};

/// How an [`EventSink`] batches.
#[derive(Debug, Clone, Copy)]
pub struct SinkOptions {
    /// Events queued at most, waiting for the writer; a full queue makes
    /// [`EventSink::submit`] wait and [`EventSink::try_submit`] refuse
    /// (default 10,000).
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
    /// Events in batches that failed, or whose key or model the writer
    /// could not look up.
    pub failed: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Events [`EventSink::try_submit`] refused because the queue was full
    /// (never queued, so neither committed nor failed).
    pub refused_full: u64,
}

/// Batched, bounded, reporting event ingestion; see the module docs.
pub struct EventSink {
    store: Arc<Store>,
    state: Arc<State<ValidEvent<'static>>>,
    refused_full: AtomicU64,
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
        let state = Arc::new(State::new(options.capacity));
        let writer = {
            let store = Arc::clone(&store);
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name("keytally-sink".to_owned())
                .spawn(move || {
                    write_batches(
                        |batch: &[ValidEvent<'static>]| {
                            store.events().record_valid_settled(batch).map(|_| ())
                        },
                        |pending: ValidEvent<'static>| {
                            Ok(store
                                .events()
                                .prepare(&pending.event)
                                .map_err(|refused| refused.at(0))?
                                .into_owned())
                        },
                        &state,
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
            state,
            refused_full: AtomicU64::new(0),
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
        let mut queue = self
            .state
            .taken
            .wait_while(self.state.lock_queue(), |queue| {
                queue.items.len() >= self.state.capacity && !queue.closed
            })
            .unwrap_or_else(PoisonError::into_inner);
        self.state.push(&mut queue, prepared, true)
    }

    /// Validates `event` and queues it without waiting, for async servers:
    /// neither for queue space nor for the database. The fields are checked
    /// at once; the key and models come from memory when this store has seen
    /// them (a key it resolved, a model it recorded), and otherwise the
    /// writer looks them up before the batch, failing this ticket alone if
    /// the key does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] for a bad field (nothing is queued),
    /// [`Error::SinkFull`] when the queue is full (nothing is queued; the
    /// count is in [`SinkReport::refused_full`]), [`Error::Closed`] if the
    /// sink is closing.
    pub fn try_submit(&self, event: &NewEvent) -> Result<Ticket> {
        let events = self.store.events();
        let (item, ready) = match events
            .prepare_in_memory(event)
            .map_err(|refused| refused.at(0))?
        {
            Some(valid) => (valid.into_owned(), true),
            None => (ValidEvent::unresolved(event.clone()), false),
        };
        let mut queue = self.state.lock_queue();
        if queue.items.len() >= self.state.capacity && !queue.closed {
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            return Err(Error::SinkFull {
                capacity: self.state.capacity,
            });
        }
        self.state.push(&mut queue, item, ready)
    }

    /// Waits until the ticket's batch is committed (`Ok`) or has failed.
    ///
    /// # Errors
    ///
    /// [`Error::BatchFailed`] with the reason the event was not committed,
    /// also when the writer thread ended before it (it panicked).
    /// [`Error::CommitUnknown`] only if the connection to a PostgreSQL
    /// server was lost while the batch committed and the server did not
    /// come back within 30 s to say whether it was.
    pub fn wait(&self, ticket: Ticket) -> Result<()> {
        self.state.outcome(ticket.0)
    }

    /// Waits until everything submitted so far is committed or has failed.
    ///
    /// # Errors
    ///
    /// [`Error::BatchFailed`] if any batch failed since the sink started.
    pub fn flush(&self) -> Result<()> {
        self.flush_until(None)
    }

    /// [`Self::flush`], waiting at most `timeout`: for a shutdown that must
    /// end in time.
    ///
    /// # Errors
    ///
    /// [`Error::FlushTimedOut`] if events are still unsettled when the time
    /// is up (they stay queued), or [`Self::flush`]'s errors.
    pub fn flush_within(&self, timeout: Duration) -> Result<()> {
        self.flush_until(Some(timeout))
    }

    fn flush_until(&self, timeout: Option<Duration>) -> Result<()> {
        let last = self.state.lock_queue().last_ticket;
        let progress = self.state.settled_through(last, timeout);
        if progress.settled_through < last {
            if progress.writer_gone {
                return Err(writer_gone());
            }
            return Err(Error::FlushTimedOut {
                unsettled: last - progress.settled_through,
                waited_ms: timeout.unwrap_or_default().as_millis(),
            });
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
        let last = self.state.lock_queue().last_ticket;
        let settled = self.state.lock_progress().settled_through;
        last.saturating_sub(settled)
    }

    /// What the sink has done so far.
    pub fn report(&self) -> SinkReport {
        let mut report = self.state.lock_progress().report.clone();
        report.refused_full = self.refused_full.load(Ordering::Relaxed);
        report
    }

    /// Commits everything queued, stops the writer and reports.
    ///
    /// # Errors
    ///
    /// [`Error::BatchFailed`] if any event was not committed; the counts are
    /// then in the message.
    pub fn close(mut self) -> Result<SinkReport> {
        self.stop();
        let report = self.report();
        let submitted = self.state.lock_queue().last_ticket;
        let unsettled = submitted.saturating_sub(self.state.lock_progress().settled_through);
        if report.failed > 0 || unsettled > 0 {
            return Err(Error::BatchFailed {
                message: format!(
                    "{} events committed, {} not committed",
                    report.committed,
                    report.failed + unsettled
                ),
            });
        }
        Ok(report)
    }

    fn stop(&mut self) {
        // A closed queue ends the writer's loop once it is empty.
        self.state.lock_queue().closed = true;
        self.state.queued.notify_all();
        self.state.taken.notify_all();
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
