//! Session records in memory, in front of sled, so that a validate is a hash lookup instead of a
//! B-tree walk. At a million sessions and more, a validate that misses reads a leaf of sled's tree
//! that is rarely in its page cache (sled materialises the whole leaf to read one key): about an
//! eighth of the rate of a hit. So this cache is built to hold every live session of a store of
//! real size, not a hot few:
//! - it holds records **encoded** (about 200-300 bytes for a browser session, a third of the
//!   decoded form), decoded on each hit;
//! - the writer puts every session it writes **through** into it, so new sessions are in memory
//!   from their creation, not from their first miss;
//! - at open, the writer **warms** it from the tree (see `SledStore::open`), so a restarted store
//!   answers from memory again within seconds, while it already serves reads from sled;
//! - it is bounded by bytes (`session_cache_mib`), evicting an arbitrary entry when full.
//!
//! Correctness rests on one rule: only the writer changes sessions, and it brackets every batch
//! with an epoch that is odd while the batch is being applied and its entries replaced here.
//! A reader that missed fills the entry only if the epoch is even and unchanged since before it
//! read sled (checked under the entry's shard lock, which the writer also takes). So a value read
//! before a write can never be put back after that write replaced or dropped it.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
};

use crate::token::SessionId;

const SHARDS: usize = 16;
/// What an entry costs beyond its bytes: its slot in the table (id, pointer, length, control byte,
/// at the table's load factor) and the allocator's header and rounding.
pub const ENTRY_OVERHEAD: usize = 80;

/// Session ids are random, made by this service: their bytes are already a good hash, and since
/// only ids the service made are ever inserted, nobody can choose colliding ones. (The shard is
/// chosen by the first byte, so the hash takes other bytes.)
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `SessionId` hashes as its 16 bytes (after a length prefix, which lands here too).
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

type Table = HashMap<SessionId, Box<[u8]>, BuildHasherDefault<IdHasher>>;

/// One shard's entries and the bytes they are counted at.
#[derive(Default)]
struct Shard {
    entries: Table,
    bytes: usize,
}

impl Shard {
    fn remove(&mut self, id: &SessionId) {
        if let Some(v) = self.entries.remove(id) {
            self.bytes -= weight(&v);
        }
    }

    /// Puts `record` in, evicting others while over `budget`.
    fn insert(&mut self, id: SessionId, record: Box<[u8]>, budget: usize) {
        self.remove(&id);
        let w = weight(&record);
        if w > budget {
            return;
        }
        while self.bytes + w > budget {
            // Any entries will do: sessions are used at random, and sled still holds what this
            // drops. Victims are found scanning the table from its front, which evictions leave
            // empty, so each scan takes a batch: enough for this record and 1/256 of the budget
            // (one at a time cost 1.6 us a scan in a shard of 75,000, under the shard's lock).
            let wanted = (self.bytes + w - budget) + budget / 256;
            let mut freed = 0;
            let victims: Vec<SessionId> = self
                .entries
                .iter()
                .take_while(|(_, record)| {
                    let more = freed < wanted;
                    freed += weight(record);
                    more
                })
                .map(|(id, _)| *id)
                .collect();
            if victims.is_empty() {
                break;
            }
            for victim in &victims {
                self.remove(victim);
            }
        }
        self.entries.insert(id, record);
        self.bytes += w;
    }
}

fn weight(record: &[u8]) -> usize {
    record.len() + ENTRY_OVERHEAD
}

pub struct SessionCache {
    shards: Vec<Mutex<Shard>>,
    epoch: AtomicU64,
    /// Reads that went to sled, for the metrics: how an operator sees the cache is too small.
    misses: AtomicU64,
    /// Bytes each shard may hold.
    per_shard: usize,
}

/// The session cache as the metrics show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    /// What the entries are counted at against `session_cache_mib`.
    pub bytes: usize,
    /// Reads that were not in memory, since the store opened.
    pub misses: u64,
}

/// Where a reader stood before it read sled.
#[derive(Clone, Copy, Debug)]
pub struct ReadTicket(u64);

/// What a batch did to one session: its new record, or `None` when the cache must forget it.
pub type Change = (SessionId, Option<Box<[u8]>>);

impl SessionCache {
    /// Holds at most about `capacity_bytes` of records (0 turns it off).
    pub fn new(capacity_bytes: usize) -> Self {
        SessionCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            epoch: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            per_shard: capacity_bytes / SHARDS,
        }
    }

    fn shard(&self, id: &SessionId) -> MutexGuard<'_, Shard> {
        let i = id.spread_byte() as usize % SHARDS;
        // Plain values: a panic elsewhere cannot leave a map half-updated.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads a cached record in place (decoding it under the shard's lock costs less than copying
    /// it out).
    pub fn get<T>(&self, id: &SessionId, read: impl FnOnce(&[u8]) -> T) -> Option<T> {
        self.shard(id).entries.get(id).map(|v| read(v))
    }

    /// Call before reading sled on a miss; `None` while a write is in progress.
    pub fn before_read(&self) -> Option<ReadTicket> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let e = self.epoch.load(Ordering::SeqCst);
        (e % 2 == 0).then_some(ReadTicket(e))
    }

    /// Keeps what was read from sled, unless a write began since `ticket`.
    pub fn fill(&self, ticket: ReadTicket, id: SessionId, record: &[u8]) {
        if weight(record) > self.per_shard {
            return;
        }
        let mut shard = self.shard(&id);
        if self.epoch.load(Ordering::SeqCst) != ticket.0 {
            return;
        }
        shard.insert(id, record.into(), self.per_shard);
    }

    /// The writer only, outside any batch: adds a record read from the tree if there is room
    /// without evicting. False once the cache is full (warming stops there).
    pub fn warm(&self, id: SessionId, record: &[u8]) -> bool {
        let mut shard = self.shard(&id);
        if shard.bytes + weight(record) > self.per_shard {
            return false;
        }
        if !shard.entries.contains_key(&id) {
            shard.bytes += weight(record);
            shard.entries.insert(id, record.into());
        }
        true
    }

    /// The writer, before applying a batch.
    pub fn write_begins(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The writer, after applying a batch: puts in the records it wrote, in order, and forgets the
    /// sessions it ended or deleted. If the batch failed, forgets every session it touched.
    pub fn write_ends(&self, changes: Vec<Change>, applied: bool) {
        for (id, record) in changes {
            let mut shard = self.shard(&id);
            match record.filter(|_| applied) {
                Some(record) => shard.insert(id, record, self.per_shard),
                None => shard.remove(&id),
            }
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// What the metrics show of it.
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = self.held();
        CacheStats {
            entries,
            bytes,
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Entries and the bytes they are counted at.
    fn held(&self) -> (usize, usize) {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(PoisonError::into_inner);
                (s.entries.len(), s.bytes)
            })
            .fold((0, 0), |(n, b), (n2, b2)| (n + n2, b + b2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> SessionId {
        SessionId::from_bytes([i; 16])
    }

    fn get(cache: &SessionCache, id: &SessionId) -> Option<Vec<u8>> {
        cache.get(id, <[u8]>::to_vec)
    }

    #[test]
    fn a_fill_is_kept_when_no_write_intervened() {
        let cache = SessionCache::new(100 * 1024);
        let t = cache.before_read().expect("no write in progress");
        cache.fill(t, id(1), b"v0");
        assert_eq!(get(&cache, &id(1)).as_deref(), Some(&b"v0"[..]));
    }

    #[test]
    fn a_write_replaces_what_it_wrote_and_forgets_what_it_ended() {
        let cache = SessionCache::new(100 * 1024);
        let t = cache.before_read().expect("ticket");
        cache.fill(t, id(1), b"v0");
        cache.write_begins();
        cache.write_ends(
            vec![(id(1), Some(b"v1".to_vec().into())), (id(2), None)],
            true,
        );
        assert_eq!(get(&cache, &id(1)).as_deref(), Some(&b"v1"[..]));
        cache.write_begins();
        cache.write_ends(vec![(id(1), None)], true);
        assert_eq!(get(&cache, &id(1)), None, "an ended session is forgotten");
    }

    #[test]
    fn a_failed_write_forgets_instead_of_writing_through() {
        let cache = SessionCache::new(100 * 1024);
        let t = cache.before_read().expect("ticket");
        cache.fill(t, id(1), b"v0");
        cache.write_begins();
        cache.write_ends(vec![(id(1), Some(b"v1".to_vec().into()))], false);
        assert_eq!(get(&cache, &id(1)), None);
    }

    #[test]
    fn a_value_read_before_a_write_is_never_put_back_after_it() {
        let cache = SessionCache::new(100 * 1024);
        // Read sled, then the writer applies and writes through, then the reader tries to fill.
        let t = cache.before_read().expect("ticket");
        cache.write_begins();
        cache.write_ends(vec![(id(2), Some(b"revoked".to_vec().into()))], true);
        cache.fill(t, id(2), b"active");
        assert_eq!(get(&cache, &id(2)).as_deref(), Some(&b"revoked"[..]));
        // The same when the write forgot the session.
        let t = cache.before_read().expect("ticket");
        cache.write_begins();
        cache.write_ends(vec![(id(2), None)], true);
        cache.fill(t, id(2), b"active");
        assert_eq!(get(&cache, &id(2)), None);
        // A write still in progress: no ticket at all.
        cache.write_begins();
        assert!(cache.before_read().is_none());
        cache.write_ends(Vec::new(), true);
        assert!(cache.before_read().is_some());
    }

    #[test]
    fn the_byte_bound_holds_whatever_the_sizes() {
        let budget = SHARDS * 4096;
        let cache = SessionCache::new(budget);
        for i in 0..=255u8 {
            // Small and large records alike, as sessions with and without attributes.
            let size = if i % 2 == 0 { 100 } else { 3000 };
            cache.write_begins();
            cache.write_ends(vec![(id(i), Some(vec![i; size].into()))], true);
        }
        let (entries, bytes) = cache.held();
        assert!(entries > 0);
        assert!(bytes <= budget, "{bytes} bytes held, budget {budget}");
        // What is counted is what is there: forget everything and nothing is left over.
        cache.write_begins();
        cache.write_ends((0..=255u8).map(|i| (id(i), None)).collect(), true);
        assert_eq!(cache.held(), (0, 0));
    }

    #[test]
    fn warming_stops_when_full_and_never_evicts() {
        let cache = SessionCache::new(SHARDS * (ENTRY_OVERHEAD + 100));
        // All in one shard (same last byte): room for exactly one.
        let a = SessionId::from_bytes([7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let b = SessionId::from_bytes([7, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(cache.warm(a, &[1; 100]));
        assert!(!cache.warm(b, &[2; 100]), "full: warming stops");
        assert!(get(&cache, &a).is_some(), "and keeps what it had");
        assert!(get(&cache, &b).is_none());
    }

    #[test]
    fn ids_of_one_millisecond_spread_over_the_shards() {
        // Room for one record a shard: what gets in counts the shards the ids reached.
        let cache = SessionCache::new(SHARDS * (ENTRY_OVERHEAD + 100));
        let generator = crate::token::TokenGenerator::from_seed([9; 32]);
        let now = crate::clock::Timestamp::from_millis(1_800_000_000_000);
        for _ in 0..SHARDS * 8 {
            cache.warm(generator.session_id(now), &[1; 100]);
        }
        let (entries, _) = cache.held();
        assert!(entries > SHARDS / 2, "{entries} of {SHARDS} shards reached");
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let cache = SessionCache::new(0);
        let t = cache.before_read().expect("ticket");
        cache.fill(t, id(3), b"v");
        cache.write_begins();
        cache.write_ends(vec![(id(4), Some(b"v".to_vec().into()))], true);
        assert!(!cache.warm(id(5), b"v"));
        assert_eq!(cache.held(), (0, 0));
    }
}

#[cfg(test)]
mod eviction_cost {
    use super::*;

    /// Not a check: prints what an insert that evicts costs in a full shard of realistic size
    /// (`cargo test --release --lib eviction_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn print_the_cost_of_evicting_inserts() {
        let record = vec![7u8; 250];
        let per_shard = 75_000 * weight(&record);
        let mut shard = Shard::default();
        let mut next = 0u64;
        let mut id = || {
            next += 1;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&next.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
            b[8..].copy_from_slice(&next.to_le_bytes());
            SessionId::from_bytes(b)
        };
        for _ in 0..75_000 {
            shard.insert(id(), record.clone().into(), per_shard);
        }
        let mut roomy = Shard::default();
        let t = std::time::Instant::now();
        for _ in 0..100_000 {
            roomy.insert(id(), record.clone().into(), usize::MAX);
        }
        println!(
            "without eviction: {:.2} us per insert",
            t.elapsed().as_secs_f64() * 1e6 / 100_000.0
        );
        for round in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..100_000 {
                shard.insert(id(), record.clone().into(), per_shard);
            }
            println!(
                "round {round}: {:.2} us per evicting insert, {} entries",
                t.elapsed().as_secs_f64() * 1e6 / 100_000.0,
                shard.entries.len()
            );
        }
    }
}
