//! Decoded sessions in memory, in front of sled: a validate becomes a hash lookup instead of a
//! B-tree walk and a decode (the walk was most of a validate's own cost in profiles).
//!
//! Correctness rests on one rule: only the writer changes sessions, and it brackets every batch
//! with an epoch that is odd while the batch is being applied and its sessions dropped from here.
//! A reader that missed fills the entry only if the epoch is even and unchanged since before it
//! read sled (checked under the entry's shard lock, which the writer also takes to drop entries).
//! So a value read before a write can never be put back after that write dropped it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
};

use crate::{sessions::model::Session, token::SessionId};

const SHARDS: usize = 16;

/// Generic over the value only so that tests can use plain values.
pub struct SessionCache<V = Session> {
    shards: Vec<Mutex<HashMap<SessionId, Arc<V>>>>,
    epoch: AtomicU64,
    per_shard: usize,
}

/// Where a reader stood before it read sled.
#[derive(Clone, Copy, Debug)]
pub struct ReadTicket(u64);

impl<V> SessionCache<V> {
    /// Holds at most about `capacity` sessions (0 turns it off).
    pub fn new(capacity: usize) -> Self {
        SessionCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            epoch: AtomicU64::new(0),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, id: &SessionId) -> MutexGuard<'_, HashMap<SessionId, Arc<V>>> {
        // Session ids are random: their first byte spreads them evenly.
        let i = id.as_bytes()[0] as usize % SHARDS;
        // Plain values: a panic elsewhere cannot leave a map half-updated.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, id: &SessionId) -> Option<Arc<V>> {
        self.shard(id).get(id).cloned()
    }

    /// Call before reading sled on a miss; `None` while a write is in progress.
    pub fn before_read(&self) -> Option<ReadTicket> {
        let e = self.epoch.load(Ordering::SeqCst);
        (e % 2 == 0).then_some(ReadTicket(e))
    }

    /// Keeps what was read from sled, unless a write began since `ticket`.
    pub fn fill(&self, ticket: ReadTicket, id: SessionId, session: Arc<V>) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(&id);
        if self.epoch.load(Ordering::SeqCst) != ticket.0 {
            return;
        }
        if shard.len() >= self.per_shard && !shard.contains_key(&id) {
            // Any entry will do: sled's own cache still holds what this one drops.
            if let Some(victim) = shard.keys().next().copied() {
                shard.remove(&victim);
            }
        }
        shard.insert(id, session);
    }

    /// The writer, before applying a batch.
    pub fn write_begins(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The writer, after applying a batch (or failing to): drops every session it wrote.
    pub fn write_ends(&self, changed: &[SessionId]) {
        for id in changed {
            self.shard(id).remove(id);
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: SessionId) -> Arc<String> {
        Arc::new(id.to_string())
    }

    #[test]
    fn a_fill_is_kept_when_no_write_intervened() {
        let cache = SessionCache::<String>::new(100);
        let id = SessionId::from_bytes([1; 16]);
        let t = cache.before_read().expect("no write in progress");
        cache.fill(t, id, session(id));
        assert!(cache.get(&id).is_some());
        cache.write_begins();
        cache.write_ends(&[id]);
        assert!(cache.get(&id).is_none(), "a write drops what it changed");
    }

    #[test]
    fn a_value_read_before_a_write_is_never_put_back_after_it() {
        let cache = SessionCache::<String>::new(100);
        let id = SessionId::from_bytes([2; 16]);
        // Read sled, then the writer applies and drops, then the reader tries to fill.
        let t = cache.before_read().expect("ticket");
        cache.write_begins();
        cache.write_ends(&[id]);
        cache.fill(t, id, session(id));
        assert!(cache.get(&id).is_none());
        // A write still in progress: no ticket at all.
        cache.write_begins();
        assert!(cache.before_read().is_none());
        cache.write_ends(&[]);
        assert!(cache.before_read().is_some());
    }

    #[test]
    fn capacity_holds() {
        let cache = SessionCache::<String>::new(SHARDS * 2);
        for i in 0..=255u8 {
            let id = SessionId::from_bytes([i; 16]);
            let t = cache.before_read().expect("ticket");
            cache.fill(t, id, session(id));
        }
        let total: usize = cache
            .shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(total <= SHARDS * 2, "{total}");
    }
}
