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

use crate::{model::session::Session, token::SessionId};

const SHARDS: usize = 16;
/// What an entry costs beyond its value: the map's slot, the key, the `Arc` header.
const ENTRY_OVERHEAD: usize = 64;

/// Roughly the bytes a value holds, so the cache can be bounded by memory rather than by entries:
/// sessions range from a few hundred bytes to about 8 KiB (all attributes, longest user agent).
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Session {
    fn weight(&self) -> usize {
        let string = std::mem::size_of::<String>();
        let location = self
            .device
            .location
            .as_ref()
            .map_or(0, |l| l.country.len() + l.city.len());
        std::mem::size_of::<Session>()
            + self.tenant_id.len()
            + self.user_id.len()
            + self.device.user_agent.len()
            + self.device.label.len()
            + location
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2 * string + 16)
                .sum::<usize>()
            + self.flags.len() * std::mem::size_of::<crate::model::travel::TravelFlag>()
    }
}

impl Weigh for String {
    fn weight(&self) -> usize {
        std::mem::size_of::<String>() + self.len()
    }
}

/// One shard's entries, each with its weight, and their total.
struct Shard<V> {
    entries: HashMap<SessionId, (Arc<V>, usize)>,
    bytes: usize,
}

impl<V> Shard<V> {
    fn remove(&mut self, id: &SessionId) {
        if let Some((_, w)) = self.entries.remove(id) {
            self.bytes -= w;
        }
    }
}

/// Generic over the value only so that tests can use plain values.
pub struct SessionCache<V = Session> {
    shards: Vec<Mutex<Shard<V>>>,
    epoch: AtomicU64,
    /// Bytes each shard may hold.
    per_shard: usize,
}

/// Where a reader stood before it read sled.
#[derive(Clone, Copy, Debug)]
pub struct ReadTicket(u64);

impl<V: Weigh> SessionCache<V> {
    /// Holds at most about `capacity_bytes` of sessions (0 turns it off).
    pub fn new(capacity_bytes: usize) -> Self {
        SessionCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: HashMap::new(),
                        bytes: 0,
                    })
                })
                .collect(),
            epoch: AtomicU64::new(0),
            per_shard: capacity_bytes / SHARDS,
        }
    }

    fn shard(&self, id: &SessionId) -> MutexGuard<'_, Shard<V>> {
        // Session ids are random: their first byte spreads them evenly.
        let i = id.as_bytes()[0] as usize % SHARDS;
        // Plain values: a panic elsewhere cannot leave a map half-updated.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, id: &SessionId) -> Option<Arc<V>> {
        self.shard(id).entries.get(id).map(|(v, _)| v.clone())
    }

    /// Call before reading sled on a miss; `None` while a write is in progress.
    pub fn before_read(&self) -> Option<ReadTicket> {
        let e = self.epoch.load(Ordering::SeqCst);
        (e % 2 == 0).then_some(ReadTicket(e))
    }

    /// Keeps what was read from sled, unless a write began since `ticket`.
    pub fn fill(&self, ticket: ReadTicket, id: SessionId, session: Arc<V>) {
        let weight = session.weight() + ENTRY_OVERHEAD;
        if weight > self.per_shard {
            return;
        }
        let mut shard = self.shard(&id);
        if self.epoch.load(Ordering::SeqCst) != ticket.0 {
            return;
        }
        shard.remove(&id);
        while shard.bytes + weight > self.per_shard {
            // Any entry will do: sled's own cache still holds what this one drops.
            let Some(victim) = shard.entries.keys().next().copied() else {
                break;
            };
            shard.remove(&victim);
        }
        shard.entries.insert(id, (session, weight));
        shard.bytes += weight;
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
        let cache = SessionCache::<String>::new(100 * 1024);
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
        let cache = SessionCache::<String>::new(100 * 1024);
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

    fn held(cache: &SessionCache<String>) -> (usize, usize) {
        cache
            .shards
            .iter()
            .map(|s| {
                s.lock()
                    .map(|m| (m.entries.len(), m.bytes))
                    .unwrap_or((0, 0))
            })
            .fold((0, 0), |(n, b), (n2, b2)| (n + n2, b + b2))
    }

    #[test]
    fn the_byte_bound_holds_whatever_the_sizes() {
        let budget = SHARDS * 4096;
        let cache = SessionCache::<String>::new(budget);
        for i in 0..=255u8 {
            let id = SessionId::from_bytes([i; 16]);
            let t = cache.before_read().expect("ticket");
            // Small and large values alike, as sessions with and without attributes.
            let size = if i % 2 == 0 { 100 } else { 3000 };
            cache.fill(t, id, Arc::new("x".repeat(size)));
        }
        let (entries, bytes) = held(&cache);
        assert!(entries > 0);
        assert!(bytes <= budget, "{bytes} bytes held, budget {budget}");
        // What is counted is what is there: drop everything and nothing is left over.
        cache.write_begins();
        let all: Vec<SessionId> = (0..=255u8)
            .map(|i| SessionId::from_bytes([i; 16]))
            .collect();
        cache.write_ends(&all);
        assert_eq!(held(&cache), (0, 0));
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let cache = SessionCache::<String>::new(0);
        let id = SessionId::from_bytes([3; 16]);
        let t = cache.before_read().expect("ticket");
        cache.fill(t, id, session(id));
        assert!(cache.get(&id).is_none());
    }
}
