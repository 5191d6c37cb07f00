//! What recording keeps of budgets' spend between transactions
//! on SQLite ([`SpendMemory`]), and the rule it adds a key's events by
//! ([`walk`]). See the parent module for how the spend is kept.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::BudgetRow;
use crate::model::event::EventId;
use crate::model::price::Cost;
use crate::model::time::Timestamp;

/// How many hours `rollup_hour` may fall behind a key's events before
/// recording folds them, however few rows they hold: the rows to read
/// stay bounded while [`SpendMemory`] spares recording from reading them.
pub(super) const FOLD_HOURS: i64 = 64;

/// A key's budget row as stored, and the whole spend of its period.
#[derive(Debug, Clone, Copy)]
pub(super) struct KnownSpend {
    pub(super) stored: BudgetRow,
    pub(super) spend: i64,
}

impl KnownSpend {
    /// Adds a batch's events of the key (with a cost, in time order) when
    /// that leaves the budget row as it is: every event is of the stored
    /// period, from `rollup_hour` on and at most [`FOLD_HOURS`] after it,
    /// not too far ahead of the clock, and reaches neither limit. Otherwise
    /// changes nothing and returns false.
    pub(super) fn add_within(&mut self, events: &[(Timestamp, Cost)], horizon: Timestamp) -> bool {
        let Some(from_hour) = self.stored.rollup_hour else {
            return false;
        };
        let budget = self.stored.budget();
        let start = Timestamp::from_stored(self.stored.period_start);
        let mut spend = self.spend;
        for &(ts, cost) in events {
            let hour = ts.hour();
            if ts > horizon
                || hour < from_hour
                || hour.saturating_sub(from_hour) > FOLD_HOURS
                || budget.period.start_of(ts) != Some(start)
            {
                return false;
            }
            let after = spend.saturating_add(cost.nanos());
            let reaches = |limit: i64| spend < limit && after >= limit;
            if reaches(self.stored.budget_nanos) || self.stored.soft_nanos.is_some_and(reaches) {
                return false;
            }
            spend = after;
        }
        self.spend = spend;
        true
    }
}

/// The budget rows and spends that this store's recording transactions
/// last left, trusted while the database's `events` counter and count of
/// budget changes (`sequences`; triggers count every write to
/// `key_budgets`) are the ones the last transaction left, and it
/// committed: nothing else recorded or wrote a budget since. A batch's
/// events of a key then add to its spend in memory (no statement at all)
/// while they leave the row as it is; otherwise `sqlite` reads and writes
/// the row. The first time a key is seen after that, or after the memory
/// was dropped, is a read.
#[derive(Debug, Default)]
pub(crate) struct SpendMemory {
    spends: Mutex<Spends>,
}

#[derive(Debug, Default)]
pub(super) struct Spends {
    /// The `events` counter and count of budget changes that the last
    /// transaction known to have committed left; `None` while a
    /// transaction uses the memory.
    pub(super) stamp: Option<(i64, i64)>,
    /// The same for the transaction that used the memory last, until it is
    /// known to have committed ([`SpendMemory::committed`]).
    pub(super) pending: Option<(i64, i64)>,
    /// Per key row id: its budget row and spend, `None` without a budget.
    pub(super) keys: HashMap<i64, Option<KnownSpend>>,
}

impl SpendMemory {
    /// The memory, for a recording transaction that read `stamp` as it
    /// began: emptied unless the stamp is the one the last committed
    /// transaction left, and untrusted until this one is known to have
    /// committed.
    pub(super) fn begin(&self, stamp: (i64, i64)) -> MutexGuard<'_, Spends> {
        let mut memory = self.spends.lock().unwrap_or_else(PoisonError::into_inner);
        memory.pending = None;
        if memory.stamp.take() != Some(stamp) {
            memory.keys.clear();
        }
        memory
    }

    /// The recording transaction that gave these event ids committed: what
    /// it left in memory holds.
    pub(crate) fn committed(&self, ids: &[EventId]) {
        let Some(last) = ids.last() else {
            return;
        };
        let mut memory = self.spends.lock().unwrap_or_else(PoisonError::into_inner);
        if memory.pending.map(|(events, _)| events) == Some(last.0.saturating_add(1)) {
            memory.stamp = memory.pending.take();
        }
    }
}

impl Spends {
    /// Keeps what a transaction left of a key's budget and spend.
    pub(super) fn remember(&mut self, key_row_id: i64, known: Option<KnownSpend>) {
        if self.keys.len() >= SPEND_MEMORY_KEYS {
            self.keys.clear();
        }
        self.keys.insert(key_row_id, known);
    }
}

/// The most keys [`SpendMemory`] holds; it starts again empty past that.
const SPEND_MEMORY_KEYS: usize = 1 << 20;

/// An event that took its period's spend from `before` to `after`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    pub(super) period: i64,
    pub(super) before: i64,
    pub(super) after: i64,
}

/// A key's events (with a cost, in time order) walked as one spend from
/// the stored period's start and its `spend`: an event after `horizon` (too
/// far ahead of the clock), before the first period or of an earlier
/// period than the running one counts for nothing; one of a later period
/// starts the spend again. Returns the period's start and spend after
/// them, and the steps that reached the soft limit or the budget.
pub(super) fn walk(
    row: &BudgetRow,
    spend: i64,
    events: &[(Timestamp, Cost)],
    horizon: Timestamp,
) -> (i64, i64, Vec<Step>) {
    let budget = row.budget();
    let (mut start, mut spend) = (row.period_start, spend);
    let mut reached = Vec::new();
    for &(ts, cost) in events {
        if ts > horizon {
            continue;
        }
        let Some(period) = budget.period.start_of(ts).map(Timestamp::as_millis) else {
            // Before the first period.
            continue;
        };
        if period < start {
            // An earlier period: its usage counts, not against this budget.
            continue;
        }
        let before = if period > start { 0 } else { spend };
        let after = before.saturating_add(cost.nanos());
        (start, spend) = (period, after);
        let reaches = |limit: i64| before < limit && after >= limit;
        if reaches(row.budget_nanos) || row.soft_nanos.is_some_and(reaches) {
            reached.push(Step {
                period,
                before,
                after,
            });
        }
    }
    (start, spend, reached)
}
