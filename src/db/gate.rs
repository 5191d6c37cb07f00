//! [`WriteGate`]: the queue a store's writers wait in before they ask
//! SQLite for its write lock.

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};

thread_local! {
    /// The gate this thread holds, by address (0: none), so that a write
    /// started inside another write of the same store is refused rather
    /// than left waiting for itself.
    static HELD: Cell<usize> = const { Cell::new(0) };
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
    _lock: MutexGuard<'a, ()>,
    previous: usize,
}

impl WriteGate {
    /// Waits for this thread's turn.
    ///
    /// # Errors
    ///
    /// [`Error::NestedWrite`] if this thread already holds the gate.
    pub(crate) fn enter(&self) -> Result<GateGuard<'_>> {
        let address = std::ptr::from_ref(self) as usize;
        if HELD.get() == address {
            return Err(Error::NestedWrite);
        }
        let lock = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(GateGuard {
            _lock: lock,
            previous: HELD.replace(address),
        })
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        HELD.set(self.previous);
    }
}
