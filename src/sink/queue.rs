//! The sink's queue and its writer thread: events waiting under one lock,
//! tickets handed out in queue order, and the thread that commits them in
//! batches and settles every ticket.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sink::{SinkOptions, SinkReport, Ticket};

/// Tickets whose events could not be committed.
#[derive(Debug, Clone)]
pub(super) struct FailedRange {
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) message: String,
    /// Whether the events may have been stored after all (the server could
    /// not say, see [`Error::CommitUnknown`]).
    pub(super) maybe_stored: bool,
}

/// A queued event: `ready` when its key and models are resolved, otherwise
/// the writer resolves them first.
pub(super) struct Queued<T> {
    ticket: u64,
    item: T,
    ready: bool,
}

pub(super) struct Queue<T> {
    pub(super) items: VecDeque<Queued<T>>,
    /// The last ticket handed out.
    pub(super) last_ticket: u64,
    /// No more submissions: the writer ends once the queue is empty.
    pub(super) closed: bool,
    /// The queue length at which the writer wants to be woken: 1 while it
    /// waits for a batch's first event, the room left while it fills a
    /// batch, never while it commits (it looks at the queue when done). A
    /// wake per event would cost a context switch per event.
    wake_at: usize,
}

#[derive(Default)]
pub(super) struct Progress {
    /// Every ticket up to this one has been committed or has failed.
    pub(super) settled_through: u64,
    /// The writer thread has ended (normally, or by a panic): tickets not
    /// settled by then never will be.
    pub(super) writer_gone: bool,
    pub(super) failures: VecDeque<FailedRange>,
    pub(super) report: SinkReport,
}

pub(super) struct State<T> {
    pub(super) queue: Mutex<Queue<T>>,
    /// Signalled when an event is queued or the sink closes.
    pub(super) queued: Condvar,
    /// Signalled when the writer takes events from the queue.
    pub(super) taken: Condvar,
    pub(super) capacity: usize,
    pub(super) progress: Mutex<Progress>,
    pub(super) settled: Condvar,
}

impl<T> State<T> {
    pub(super) fn new(capacity: usize) -> State<T> {
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

    pub(super) fn lock_queue(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn lock_progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` under the next ticket. Tickets are handed out under the
    /// queue's lock, so "settled through N" covers exactly the first N.
    pub(super) fn push(&self, queue: &mut Queue<T>, item: T, ready: bool) -> Result<Ticket> {
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
    pub(super) fn settled_through(
        &self,
        last: u64,
        timeout: Option<Duration>,
    ) -> MutexGuard<'_, Progress> {
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
    pub(super) fn outcome(&self, ticket: u64) -> Result<()> {
        let progress = self.settled_through(ticket, None);
        if progress.settled_through < ticket {
            return Err(writer_gone());
        }
        match progress
            .failures
            .iter()
            .find(|range| (range.first..=range.last).contains(&ticket))
        {
            Some(range) if range.maybe_stored => Err(Error::CommitUnknown {
                source: range.message.clone().into(),
            }),
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

pub(super) fn writer_gone() -> Error {
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
        // Nothing takes from the queue any more: a producer waiting for
        // space, or one about to queue, is told the sink is closed.
        self.0.lock_queue().closed = true;
        self.0.taken.notify_all();
    }
}

/// The writer thread: commits queued events in batches with `commit`,
/// after `complete` has resolved those queued without their ids.
pub(super) fn write_batches<T>(
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
                    maybe_stored: false,
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
                    maybe_stored: matches!(error, Error::CommitUnknown { .. }),
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
    use std::sync::{mpsc, Arc};

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
        // Nothing will take from the queue again: queueing is refused.
        assert!(matches!(
            state.push(&mut state.lock_queue(), 8, true),
            Err(Error::Closed)
        ));
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
