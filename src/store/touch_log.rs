//! sled's log of last uses (format 4): where a touch writes a session's last use.
//!
//! A touch used to write one small key per session (`t` + id, format 3). At a million sessions
//! those keys sit in tens of thousands of sled leaves, and each touch inserted into a random one:
//! three quarters of the writer's time, and a third of a core at 30,000 touches a second, which
//! two cores could not spare. Here the touches of one round of the writer go into **one** key,
//! `T` + round number, whose value is the round's entries sorted by session id. Rounds are
//! numbered upwards, so each is written at the tree's right edge, in a leaf sled has in memory.
//!
//! Finding a session's entry takes an index in memory, id -> round (about 25 bytes a session at
//! the table's load), rebuilt at open by reading the rounds in order (a later round wins).
//!
//! An entry is **stale** once the record it belongs to was written in full since: every full
//! write takes the last use into the record (`SessionRecord::last_seen_at`) and files the deadline
//! entry where the record says. So an entry counts only while its `at` is after the record's
//! `last_seen_at` (`sled_store::with_last_use` checks); the writer also drops the session from the
//! index when it writes it in full, so that cleaning does not carry the entry forward.
//!
//! **Cleaning.** Every round stays until cleaned. Once the rounds hold more than twice as many
//! entries as the index (and at least `CLEAN_FLOOR`), the oldest half is read back, in bounded
//! passes after the drains of touches. Entries the index still points at and that are not stale
//! are appended again in a new round, and the index moves to it; the old rounds are deleted by the
//! writer's next write. Deleting them one write later lets a reader that took the old round from
//! the index just before it moved still find it; one that comes later finds the index changed and
//! looks again (`TouchLog::lookup`).

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasherDefault,
    sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use crate::{
    error::{Error, Result},
    token::SessionId,
};

use super::{
    keys,
    records::{self, LastUse},
    session_cache::IdHasher,
};

/// One entry: the session id, then its `LastUse` (16 bytes).
const ENTRY: usize = SessionId::LEN + 16;
/// Rounds hold fewer entries than this before cleaning is worth a pass (128 KiB).
const CLEAN_FLOOR: usize = 4096;
/// Most entries one pass of cleaning reads: passes follow drains until the log is small enough,
/// so that none holds the writer for long (a store of millions would otherwise read half its log
/// at once).
const MAX_PASS: usize = 1 << 16;
/// Most entries in one round (4 KiB). sled splits a leaf at 16 keys, and writes a node of more
/// than 128 KiB (a quarter of its 512 KiB segment) to a file of its own, one per rewrite: rounds
/// this small keep a leaf of them well under that.
pub(super) const MAX_ROUND: usize = 128;

type Index = HashMap<SessionId, u64, BuildHasherDefault<IdHasher>>;

/// The index (readers and the writer) and the rounds as the writer counts them.
pub(super) struct TouchLog {
    index: RwLock<Index>,
    rounds: Mutex<Rounds>,
    /// `CLEAN_FLOOR`, lower in tests.
    floor: usize,
}

#[derive(Default)]
struct Rounds {
    /// The next round's number.
    next: u64,
    /// The rounds stored, oldest first, with their entry counts.
    held: VecDeque<(u64, usize)>,
    /// Their entries, added up.
    entries: usize,
    /// Rounds cleaned, to delete with the next write.
    doomed: Vec<u64>,
}

impl TouchLog {
    /// Reads every round, oldest first, into the index.
    pub(super) fn open(tree: &sled::Tree) -> Result<Self> {
        let mut index = Index::default();
        let mut rounds = Rounds::default();
        for item in tree.scan_prefix([keys::TOUCH_LOG]) {
            let (key, value) = item?;
            let round = round_of(&key)?;
            let mut count = 0;
            for entry in entries(&value) {
                index.insert(entry?.0, round);
                count += 1;
            }
            rounds.held.push_back((round, count));
            rounds.entries += count;
            rounds.next = round + 1;
        }
        Ok(Self {
            index: RwLock::new(index),
            rounds: Mutex::new(rounds),
            floor: CLEAN_FLOOR,
        })
    }

    /// Sessions with an entry in the index (stale ones included until cleaned).
    pub(super) fn len(&self) -> usize {
        self.index().len()
    }

    /// Entries in the stored rounds, stale and superseded ones included.
    pub(super) fn entries(&self) -> usize {
        self.rounds().entries
    }

    /// The session's last entry, stale or not: the caller compares it with the record.
    pub(super) fn lookup(&self, tree: &sled::Tree, id: &SessionId) -> Result<Option<LastUse>> {
        let mut round = self.index().get(id).copied();
        while let Some(r) = round {
            if let Some(value) = tree.get(keys::touch_round(r))? {
                if let Some(found) = find(&value, id)? {
                    return Ok(Some(found));
                }
            }
            // Cleaned and moved since the index was read: look where it points now.
            let now = self.index().get(id).copied();
            if now == round {
                return Err(Error::Storage(format!(
                    "the last-use log lost session {id}'s entry"
                )));
            }
            round = now;
        }
        Ok(None)
    }

    /// The key and value of a new round holding `entries` (sorted here), and the work to do with
    /// the same write: rounds cleaned before, to delete. Call `written` once it is applied.
    pub(super) fn round(&self, entries: &mut [(SessionId, LastUse)]) -> Round {
        let mut rounds = self.rounds();
        let number = rounds.next;
        rounds.next += 1;
        Round {
            number,
            key: keys::touch_round(number),
            value: encode(entries),
            ids: entries.iter().map(|(id, _)| *id).collect(),
            doomed: std::mem::take(&mut rounds.doomed),
        }
    }

    /// After `round` was applied: its sessions' entries are there now.
    pub(super) fn written(&self, round: Round) {
        {
            let mut index = self.index_mut();
            for id in &round.ids {
                index.insert(*id, round.number);
            }
        }
        let mut rounds = self.rounds();
        rounds.held.push_back((round.number, round.ids.len()));
        rounds.entries += round.ids.len();
    }

    /// After a round failed to apply: its doomed rounds are still to delete.
    pub(super) fn not_written(&self, round: Round) {
        self.rounds().doomed.extend(round.doomed);
    }

    /// After sessions were written in full: their entries are stale.
    pub(super) fn forget(&self, ids: &[SessionId]) {
        if ids.is_empty() {
            return;
        }
        let mut index = self.index_mut();
        for id in ids {
            index.remove(id);
        }
    }

    /// Cleans the log if it is due (see the module's doc). `stale` says whether an entry is stale
    /// against its session's stored record (or has none). Returns the entries carried forward.
    pub(super) fn clean(
        &self,
        tree: &sled::Tree,
        stale: impl Fn(&SessionId, &LastUse) -> Result<bool>,
    ) -> Result<usize> {
        let oldest: Vec<u64> = {
            let rounds = self.rounds();
            if rounds.entries < self.floor.max(2 * self.len()) {
                return Ok(0);
            }
            let mut covered = 0;
            rounds
                .held
                .iter()
                .take_while(|(_, count)| {
                    let more = covered < (rounds.entries / 2).min(MAX_PASS);
                    covered += count;
                    more
                })
                .map(|(r, _)| *r)
                .collect()
        };
        let mut carried = Vec::new();
        let mut dropped = Vec::new();
        for &r in &oldest {
            let Some(value) = tree.get(keys::touch_round(r))? else {
                continue;
            };
            for entry in entries(&value) {
                let (id, last_use) = entry?;
                if self.index().get(&id) != Some(&r) {
                    continue; // a later round has it, or it was written in full
                }
                if stale(&id, &last_use)? {
                    dropped.push((id, r));
                } else {
                    carried.push((id, last_use));
                }
            }
        }
        let moved = carried.len();
        for chunk in carried.chunks_mut(MAX_ROUND) {
            let round = self.round(chunk);
            match apply(tree, &round) {
                Ok(()) => self.written(round),
                Err(e) => {
                    self.not_written(round);
                    return Err(e.into());
                }
            }
        }
        {
            let mut index = self.index_mut();
            for (id, r) in dropped {
                if index.get(&id) == Some(&r) {
                    index.remove(&id);
                }
            }
        }
        // Gone for counting now; deleted with the next write (see the module's doc).
        let mut rounds = self.rounds();
        for r in oldest {
            if let Some(at) = rounds.held.iter().position(|(held, _)| *held == r) {
                if let Some((_, count)) = rounds.held.remove(at) {
                    rounds.entries -= count;
                }
            }
            rounds.doomed.push(r);
        }
        Ok(moved)
    }

    fn index(&self) -> RwLockReadGuard<'_, Index> {
        // Plain values: a panic elsewhere cannot leave the map half-updated.
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn index_mut(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn rounds(&self) -> MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes `round`, then deletes the rounds it dooms. One key at a time, not a batch: a round is
/// whole on its own, and sled's log is replayed in order, so a deletion that survives a crash
/// comes with the round written before it (a sled batch would also force the log buffer to disk).
pub(super) fn apply(tree: &sled::Tree, round: &Round) -> sled::Result<()> {
    tree.insert(round.key, round.value.as_slice())?;
    for doomed in &round.doomed {
        tree.remove(keys::touch_round(*doomed))?;
    }
    Ok(())
}

/// `apply` within a batch of other writes (the batch is being applied anyway).
pub(super) fn add_to(batch: &mut sled::Batch, round: &Round) {
    batch.insert(&round.key[..], round.value.as_slice());
    for doomed in &round.doomed {
        batch.remove(&keys::touch_round(*doomed)[..]);
    }
}

/// A round to write: its key and value, then the keys of cleaned rounds to delete with it.
pub(super) struct Round {
    number: u64,
    pub key: [u8; 9],
    pub value: Vec<u8>,
    ids: Vec<SessionId>,
    pub doomed: Vec<u64>,
}

/// The entries sorted by id, one `ENTRY` each.
fn encode(entries: &mut [(SessionId, LastUse)]) -> Vec<u8> {
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Vec::with_capacity(entries.len() * ENTRY);
    for (id, last_use) in entries.iter() {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&records::encode_last_use(last_use));
    }
    out
}

/// A round's entries, in id order.
fn entries(value: &[u8]) -> impl Iterator<Item = Result<(SessionId, LastUse)>> + '_ {
    let whole = value.len() % ENTRY == 0;
    value
        .chunks(ENTRY)
        .map(move |e| decode(e).filter(|_| whole).ok_or_else(corrupt))
        .map(|r| r.and_then(|(id, l)| Ok((id, records::decode_last_use(l)?))))
}

fn decode(entry: &[u8]) -> Option<(SessionId, &[u8])> {
    (entry.len() == ENTRY).then_some(())?;
    Some((
        SessionId::from_slice(&entry[..SessionId::LEN])?,
        &entry[SessionId::LEN..],
    ))
}

/// The entry of `id` in a round, by binary search.
fn find(value: &[u8], id: &SessionId) -> Result<Option<LastUse>> {
    if value.len() % ENTRY != 0 {
        return Err(corrupt());
    }
    let (mut lo, mut hi) = (0, value.len() / ENTRY);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let entry = &value[mid * ENTRY..(mid + 1) * ENTRY];
        match entry[..SessionId::LEN].cmp(id.as_bytes()) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => {
                return records::decode_last_use(&entry[SessionId::LEN..]).map(Some)
            }
        }
    }
    Ok(None)
}

/// A stored round's number, from its key.
fn round_of(key: &[u8]) -> Result<u64> {
    keys::touch_round_of(key).ok_or_else(|| Error::Storage("corrupt last-use round key".into()))
}

fn corrupt() -> Error {
    Error::Storage("corrupt last-use round".into())
}

/// Moves format 3's last uses (`t` + id keys) into rounds of format 4, a bounded chunk to each
/// atomic batch (a store of millions would otherwise build one batch of millions of keys). A
/// crash between chunks leaves some keys moved and the rest where they were, and the next open
/// goes on from there: rounds are numbered after any already written. Returns the count moved.
pub(super) fn migrate_format_3(tree: &sled::Tree) -> Result<usize> {
    migrate_in_chunks(tree, MIGRATE_CHUNK)
}

fn migrate_in_chunks(tree: &sled::Tree, chunk: usize) -> Result<usize> {
    let mut next = match tree.scan_prefix([keys::TOUCH_LOG]).last() {
        Some(item) => round_of(&item?.0)? + 1,
        None => 0,
    };
    let mut migrated = 0;
    loop {
        let mut batch = sled::Batch::default();
        let mut entries = Vec::new();
        for item in tree.scan_prefix([keys::TOUCH]).take(chunk) {
            let (key, value) = item?;
            let id = SessionId::from_slice(&key[1..])
                .ok_or_else(|| Error::Storage("corrupt last-use key".into()))?;
            entries.push((id, records::decode_last_use(&value)?));
            batch.remove(key);
        }
        if entries.is_empty() {
            return Ok(migrated);
        }
        migrated += entries.len();
        for chunk in entries.chunks_mut(MAX_ROUND) {
            batch.insert(&keys::touch_round(next)[..], encode(chunk));
            next += 1;
        }
        tree.apply_batch(batch)?;
    }
}

/// Format 3 keys moved by one batch of the migration.
const MIGRATE_CHUNK: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;

    fn id(n: u8) -> SessionId {
        SessionId::from_bytes([n; SessionId::LEN])
    }

    fn used(at: u64) -> LastUse {
        LastUse {
            at: Timestamp::from_millis(at),
            filed: Timestamp::from_millis(at / 2),
        }
    }

    fn open_log(tree: &sled::Tree) -> TouchLog {
        TouchLog {
            floor: 1,
            ..TouchLog::open(tree).expect("open")
        }
    }

    fn write(log: &TouchLog, tree: &sled::Tree, ids: std::ops::RangeInclusive<u8>, at: u64) {
        let mut entries: Vec<_> = ids.map(|n| (id(n), used(at))).collect();
        let round = log.round(&mut entries);
        apply(tree, &round).expect("apply");
        log.written(round);
    }

    fn at(log: &TouchLog, tree: &sled::Tree, n: u8) -> Option<u64> {
        let found = log.lookup(tree, &id(n)).expect("lookup");
        found.map(|l| l.at.as_millis())
    }

    /// Cleaning carries forward the entries that are still the newest of their session and not
    /// stale, drops the stale ones, and deletes the old rounds with the next write; the log reads
    /// the same before and after, and after a reopen.
    #[test]
    fn cleaning_keeps_each_sessions_newest_entry_and_drops_the_rest() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        let log = open_log(&tree);
        write(&log, &tree, 1..=100, 1000);
        write(&log, &tree, 1..=90, 2000);
        write(&log, &tree, 1..=90, 3000);
        // Session 100 was written in full since its touch; 95 was too, and forgotten then.
        log.forget(&[id(95)]);
        let carried = log
            .clean(&tree, |id, _| Ok(id.as_bytes()[0] == 100))
            .expect("clean");
        assert_eq!(carried, 8, "91 to 99 but 95 (forgotten) and 100 (stale)");
        let expect = |log: &TouchLog| {
            for n in 1..=90 {
                assert_eq!(at(log, &tree, n), Some(3000), "session {n}");
            }
            for n in (91..=99).filter(|n| *n != 95) {
                assert_eq!(at(log, &tree, n), Some(1000), "session {n}");
            }
            assert_eq!(at(log, &tree, 95), None);
            assert_eq!(at(log, &tree, 100), None);
            assert_eq!(at(log, &tree, 101), None);
        };
        expect(&log);
        assert_eq!(log.len(), 98);
        assert_eq!(
            log.clean(&tree, |_, _| Ok(false)).expect("clean"),
            0,
            "not due"
        );
        // The cleaned rounds go with the next write.
        write(&log, &tree, 200..=200, 4000);
        let rounds: Vec<u64> = tree
            .scan_prefix([keys::TOUCH_LOG])
            .map(|e| keys::touch_round_of(&e.expect("entry").0).expect("round"))
            .collect();
        assert_eq!(rounds, vec![2, 3, 4]);
        let reopened = open_log(&tree);
        expect(&reopened);
        assert_eq!(at(&reopened, &tree, 200), Some(4000));
    }

    /// A migration that a crash stopped part way (one round already written, its keys gone) goes
    /// on where it stopped, numbering its rounds after that one, and loses no last use.
    #[test]
    fn the_format_3_migration_moves_every_last_use_and_resumes_after_a_crash() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        let mut moved_before = vec![(id(200), used(7))];
        tree.insert(keys::touch_round(5), encode(&mut moved_before))
            .expect("round");
        for n in 1..=10u8 {
            let mut key = vec![keys::TOUCH];
            key.extend_from_slice(id(n).as_bytes());
            tree.insert(key, &records::encode_last_use(&used(n.into()))[..])
                .expect("key");
        }
        assert_eq!(migrate_in_chunks(&tree, 3).expect("migrate"), 10);
        assert_eq!(
            tree.scan_prefix([keys::TOUCH]).count(),
            0,
            "no format 3 key left"
        );
        let first_new = tree
            .scan_prefix([keys::TOUCH_LOG])
            .nth(1)
            .map(|e| keys::touch_round_of(&e.expect("entry").0));
        assert_eq!(first_new, Some(Some(6)));
        let log = open_log(&tree);
        for n in 1..=10u8 {
            assert_eq!(at(&log, &tree, n), Some(n.into()), "session {n}");
        }
        assert_eq!(at(&log, &tree, 200), Some(7));
        assert_eq!(migrate_in_chunks(&tree, 3).expect("again"), 0);
    }

    #[test]
    fn a_round_finds_each_of_its_entries_and_no_other() {
        let mut round: Vec<_> = [9u8, 3, 7, 1]
            .iter()
            .map(|&n| (id(n), used(n.into())))
            .collect();
        let value = encode(&mut round);
        for n in [9u8, 3, 7, 1] {
            assert_eq!(find(&value, &id(n)).expect("find"), Some(used(n.into())));
        }
        for n in [0u8, 2, 8, 10] {
            assert_eq!(find(&value, &id(n)).expect("find"), None);
        }
        let all: Vec<_> = entries(&value).map(|e| e.expect("entry").0).collect();
        assert_eq!(all, vec![id(1), id(3), id(7), id(9)]);
        assert!(
            find(&value[1..], &id(1)).is_err(),
            "a torn round is an error"
        );
        assert!(entries(&value[1..]).any(|e| e.is_err()));
    }
}
