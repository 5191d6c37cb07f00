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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
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

/// Tickets whose events could not be committed.
#[derive(Debug, Clone)]
struct FailedRange {
    first: u64,
    last: u64,
    message: String,
}

/// A queued event: `ready` when its key and models are resolved, otherwise
/// the writer resolves them first.
struct Queued<T> {
    ticket: u64,
    item: T,
    ready: bool,
}

struct Queue<T> {
    items: VecDeque<Queued<T>>,
    /// The last ticket handed out.
    last_ticket: u64,
    /// No more submissions: the writer ends once the queue is empty.
    closed: bool,
    /// The queue length at which the writer wants to be woken: 1 while it
    /// waits for a batch's first event, the room left while it fills a
    /// batch, never while it commits (it looks at the queue when done). A
    /// wake per event would cost a context switch per event.
    wake_at: usize,
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

struct State<T> {
    queue: Mutex<Queue<T>>,
    /// Signalled when an event is queued or the sink closes.
    queued: Condvar,
    /// Signalled when the writer takes events from the queue.
    taken: Condvar,
    capacity: usize,
    progress: Mutex<Progress>,
    settled: Condvar,
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
                            store.events().record_valid(batch).map(|_| ())
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

impl<T> State<T> {
    fn new(capacity: usize) -> State<T> {
        State {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                last_ticket: 0,
                closed: false,
                wake_at: 1,
            }),
            queued: Condvar::new(),
            taken: Condvar::new(),
            capacity,
            progress: Mutex::new(Progress::default()),
            settled: Condvar::new(),
        }
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` under the next ticket. Tickets are handed out under the
    /// queue's lock, so "settled through N" covers exactly the first N.
    fn push(&self, queue: &mut Queue<T>, item: T, ready: bool) -> Result<Ticket> {
        if queue.closed {
            return Err(Error::Closed);
        }
        queue.last_ticket += 1;
        let ticket = queue.last_ticket;
        queue.items.push_back(Queued {
            ticket,
            item,
            ready,
        });
        if queue.items.len() >= queue.wake_at {
            self.queued.notify_one();
        }
        Ok(Ticket(ticket))
    }

    /// Waits until every ticket up to `last` has been committed or failed,
    /// the writer is gone, or `timeout` has passed.
    fn settled_through(&self, last: u64, timeout: Option<Duration>) -> MutexGuard<'_, Progress> {
        let pending =
            |progress: &mut Progress| progress.settled_through < last && !progress.writer_gone;
        let progress = self.lock_progress();
        match timeout {
            None => self
                .settled
                .wait_while(progress, pending)
                .unwrap_or_else(PoisonError::into_inner),
            Some(timeout) => {
                self.settled
                    .wait_timeout_while(progress, timeout, pending)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        }
    }

    /// Waits for `ticket`'s fate.
    fn outcome(&self, ticket: u64) -> Result<()> {
        let progress = self.settled_through(ticket, None);
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

    /// Takes up to `room` queued events, in ticket order.
    fn take(&self, queue: &mut Queue<T>, room: usize, into: &mut Vec<Queued<T>>) {
        let n = room.min(queue.items.len());
        into.extend(queue.items.drain(..n));
        if n > 0 {
            self.taken.notify_all();
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
struct WriterExit<'a, T>(&'a State<T>);

impl<T> Drop for WriterExit<'_, T> {
    fn drop(&mut self) {
        self.0.lock_progress().writer_gone = true;
        self.0.settled.notify_all();
    }
}

/// The writer thread: commits queued events in batches with `commit`,
/// after `complete` has resolved those queued without their ids.
fn write_batches<T>(
    commit: impl Fn(&[T]) -> Result<()>,
    complete: impl Fn(T) -> Result<T>,
    state: &State<T>,
    options: SinkOptions,
) {
    let _exit = WriterExit(state);
    let batch_size = options.batch_size.min(state.capacity);
    let mut taken: Vec<Queued<T>> = Vec::with_capacity(batch_size);
    let mut batch: Vec<T> = Vec::with_capacity(batch_size);
    loop {
        // Wait for the first event of a batch, then fill it until it is full
        // or its first event has waited `max_delay`.
        let mut queue = state.lock_queue();
        queue.wake_at = 1;
        let mut queue = state
            .queued
            .wait_while(queue, |queue| queue.items.is_empty() && !queue.closed)
            .unwrap_or_else(PoisonError::into_inner);
        if queue.items.is_empty() {
            break; // closed, and nothing left
        }
        let deadline = Instant::now() + options.max_delay;
        loop {
            state.take(&mut queue, batch_size - taken.len(), &mut taken);
            let left = deadline.saturating_duration_since(Instant::now());
            if taken.len() >= batch_size || queue.closed || left.is_zero() {
                break;
            }
            queue.wake_at = batch_size - taken.len();
            queue = state
                .queued
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        queue.wake_at = usize::MAX;
        drop(queue);
        let (Some(first), Some(last)) = (taken.first(), taken.last()) else {
            continue;
        };
        let (first_ticket, last_ticket) = (first.ticket, last.ticket);
        let mut refused = Vec::new();
        for queued in taken.drain(..) {
            if queued.ready {
                batch.push(queued.item);
                continue;
            }
            match complete(queued.item) {
                Ok(item) => batch.push(item),
                Err(error) => refused.push(FailedRange {
                    first: queued.ticket,
                    last: queued.ticket,
                    message: error.report(),
                }),
            }
        }
        let outcome = if batch.is_empty() {
            Ok(())
        } else {
            commit(&batch)
        };
        let mut progress = state.lock_progress();
        let count = batch.len() as u64;
        progress.report.failed += refused.len() as u64;
        progress.failures.extend(refused);
        match outcome {
            Ok(()) => {
                if count > 0 {
                    progress.report.committed += count;
                    progress.report.batches += 1;
                }
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
    use std::sync::mpsc;

    use super::*;

    /// The writer's panic reaches the waiters as an error instead of a wait
    /// without end: a real thread whose commit panics.
    #[test]
    #[expect(clippy::panic, reason = "the test needs a writer that panics")]
    fn a_panicking_writer_fails_its_tickets_instead_of_hanging() {
        let state = Arc::new(State::<u32>::new(4));
        let writer = {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                write_batches(
                    |_: &[u32]| -> Result<()> { panic!("commit failed in a way nobody planned") },
                    Ok,
                    &state,
                    SinkOptions::default(),
                );
            })
        };
        assert!(state.push(&mut state.lock_queue(), 7, true).is_ok());
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

    /// An event the writer cannot complete fails alone; the others of its
    /// batch are committed.
    #[test]
    fn an_event_that_cannot_be_completed_fails_alone() {
        let state = Arc::new(State::<u32>::new(8));
        let committed = Arc::new(Mutex::new(Vec::new()));
        {
            let mut queue = state.lock_queue();
            for (item, ready) in [(1, true), (2, false), (3, false), (4, true)] {
                assert!(state.push(&mut queue, item, ready).is_ok());
            }
            queue.closed = true;
        }
        let sink = Arc::clone(&committed);
        write_batches(
            |batch: &[u32]| {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(batch);
                Ok(())
            },
            |item| match item {
                2 => Err(Error::Closed),
                other => Ok(other * 10),
            },
            &state,
            SinkOptions::default(),
        );
        assert_eq!(
            *committed.lock().unwrap_or_else(PoisonError::into_inner),
            vec![1, 30, 4]
        );
        assert!(state.outcome(1).is_ok());
        assert!(matches!(state.outcome(2), Err(Error::BatchFailed { .. })));
        assert!(state.outcome(3).is_ok());
        assert!(state.outcome(4).is_ok());
        let progress = state.lock_progress();
        assert_eq!((progress.report.committed, progress.report.failed), (3, 1));
    }
}
