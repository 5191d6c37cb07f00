//! [`WriteGate`]: the queue a store's writers wait in before they ask
//! SQLite for its write lock.

use std::cell::RefCell;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};

thread_local! {
    /// The gates this thread holds, by address, so that a write started
    /// inside another write of the same store (however deeply nested in
    /// writes of other stores) is refused rather than left waiting for
    /// itself.
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Taken by every writer of one store before `BEGIN IMMEDIATE`. Writers in
/// one process then queue on a lock that wakes them in turn, instead of
/// polling SQLite's lock with growing sleeps, where an unlucky writer can
/// starve for the whole busy timeout.
#[derive(Debug, Default)]
pub(crate) struct WriteGate {
    lock: Mutex<()>,
}

/// This thread's turn at the gate, until dropped.
pub(crate) struct GateGuard<'a> {
    _lock: Option<MutexGuard<'a, ()>>,
    address: usize,
}

impl WriteGate {
    /// Waits for this thread's turn if `queue`; without it, only marks
    /// the gate as held by this thread, which refuses a nested write all
    /// the same.
    ///
    /// # Errors
    ///
    /// [`Error::NestedWrite`] if this thread already holds the gate.
    pub(crate) fn enter(&self, queue: bool) -> Result<GateGuard<'_>> {
        let address = std::ptr::from_ref(self) as usize;
        if HELD.with_borrow(|held| held.contains(&address)) {
            return Err(Error::NestedWrite);
        }
        let lock = queue.then(|| self.lock.lock().unwrap_or_else(PoisonError::into_inner));
        HELD.with_borrow_mut(|held| held.push(address));
        Ok(GateGuard {
            _lock: lock,
            address,
        })
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        HELD.with_borrow_mut(|held| {
            if let Some(position) = held.iter().rposition(|address| *address == self.address) {
                held.remove(position);
            }
        });
    }
}
