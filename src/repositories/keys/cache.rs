//! What resolving a secret read from the database, kept in memory for as
//! long as no key has changed.
//!
//! The database counts key changes (`sequences`, name `key_changes`, moved
//! by triggers on every update or deletion of a key or a secret, whichever
//! process makes it). An entry is trusted only while a resolve reads the
//! same count as the one it was read with, so a key revoked, expired, rotated
//! or restricted by any process stops resolving from the cache at its next
//! resolve. Only secrets that exist are kept: an unknown secret costs no
//! memory however often it is presented. The data kept is what the database
//! holds (the SHA-256 of a secret, never the secret).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::repositories::fast_hash::BuildFastHasher;

/// The default number of secrets kept (between this and twice as many).
pub const DEFAULT_KEY_CACHE_SIZE: usize = 65_536;

type Map<V> = HashMap<[u8; 32], V, BuildFastHasher>;

/// Recently resolved secrets by hash, valid for one key-change count.
#[derive(Debug)]
pub(crate) struct KeyCache<V> {
    capacity: usize,
    state: Mutex<State<V>>,
}

#[derive(Debug)]
struct State<V> {
    /// The key-change count every entry was read at.
    changes: i64,
    /// Entries used or added since `previous` filled up.
    current: Map<V>,
    /// The entries before: used ones move back to `current`, the rest go
    /// when `current` fills up in turn.
    previous: Map<V>,
}

impl<V: Clone> KeyCache<V> {
    /// A cache of `capacity` to twice `capacity` entries; 0 keeps nothing.
    pub(crate) fn new(capacity: usize) -> KeyCache<V> {
        KeyCache {
            capacity,
            state: Mutex::new(State {
                changes: i64::MIN,
                current: Map::default(),
                previous: Map::default(),
            }),
        }
    }

    /// The entry for a secret's hash, and the key-change count it is valid
    /// for.
    pub(crate) fn get(&self, hash: &[u8; 32]) -> Option<(i64, V)> {
        if self.capacity == 0 {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(value) = state.current.get(hash) {
            return Some((state.changes, value.clone()));
        }
        let value = state.previous.remove(hash)?;
        let changes = state.changes;
        state.insert(self.capacity, *hash, value.clone());
        Some((changes, value))
    }

    /// Keeps what was read for a secret's hash when the database's key-change
    /// count was `changes`. A higher count than the entries' drops them all;
    /// a lower one (a reader that started before a change) keeps nothing.
    pub(crate) fn put(&self, changes: i64, hash: [u8; 32], value: V) {
        if self.capacity == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if changes > state.changes {
            state.changes = changes;
            state.current = Map::default();
            state.previous = Map::default();
        }
        if changes == state.changes {
            state.insert(self.capacity, hash, value);
        }
    }
}

impl<V> State<V> {
    fn insert(&mut self, capacity: usize, hash: [u8; 32], value: V) {
        if self.current.len() >= capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(hash, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn an_entry_is_valid_for_the_count_it_was_read_at() {
        let cache = KeyCache::new(4);
        cache.put(7, hash(1), "a");
        assert_eq!(cache.get(&hash(1)), Some((7, "a")));
        assert_eq!(cache.get(&hash(2)), None);
        // A reader that saw an older count keeps nothing.
        cache.put(6, hash(2), "b");
        assert_eq!(cache.get(&hash(2)), None);
        // A newer count drops everything read before it.
        cache.put(8, hash(3), "c");
        assert_eq!(cache.get(&hash(1)), None);
        assert_eq!(cache.get(&hash(3)), Some((8, "c")));
    }

    #[test]
    fn it_holds_between_capacity_and_twice_capacity_entries() {
        let cache = KeyCache::new(2);
        for n in 0..5 {
            cache.put(1, hash(n), n);
        }
        // 0 and 1 filled `current` and moved to `previous` when 2 came; 2 and
        // 3 took their place when 4 came.
        assert_eq!(cache.get(&hash(0)), None);
        assert_eq!(cache.get(&hash(1)), None);
        assert_eq!(cache.get(&hash(4)), Some((1, 4)));
    }

    #[test]
    fn a_used_entry_outlives_an_unused_one() {
        let cache = KeyCache::new(2);
        for n in 0..3 {
            cache.put(1, hash(n), n);
        }
        // `previous` holds 0 and 1; using 0 moves it forward.
        assert_eq!(cache.get(&hash(0)), Some((1, 0)));
        cache.put(1, hash(3), 3);
        assert_eq!(cache.get(&hash(1)), None);
        assert_eq!(cache.get(&hash(0)), Some((1, 0)));
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let cache = KeyCache::new(0);
        cache.put(1, hash(1), ());
        assert_eq!(cache.get(&hash(1)), None);
    }
}
