//! A validating cache: validate through the service on a miss, answer repeats from memory, and let
//! the event stream say when an answer is no longer true.
//!
//! The guarantee, precisely:
//! - An entry is answered from memory only while the event stream is *live*: connected and caught
//!   up with the log (the server's `announce_live` heartbeat says so). While the stream is down or
//!   replaying, every call goes to the service, so an outage makes the cache miss, never lie.
//! - A session's revoke, expire or rotate event drops every cached token of that session the
//!   moment it is applied. The service sends the event before it replies to the revoke, so once a
//!   revoke's reply is in hand, the cache stops accepting the token as soon as the event arrives.
//! - A validation that was in flight when its session's event arrived is not cached (its answer
//!   may predate the event), and neither is one that overlaps a reset of the cache.
//! - No entry is served at or past the earlier of the session's idle and absolute deadlines (and,
//!   for a device-bound session, its token's `bound_token_expires_at`), less a clock margin, nor
//!   older than `max_age`. Deadlines come from the service; the comparison
//!   uses this host's clock, which must be synchronised (NTP) within the margin.
//! - If the stream is lost and cannot be resumed (OUT_OF_RANGE: the log no longer holds what was
//!   missed, or was restored from a backup so the cursor belongs to another timeline; or no
//!   cursor was ever received), everything cached is dropped. So is everything when any message
//!   carries a `log_epoch` other than the one the cache has followed so far.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
};
use tonic::{Code, Status};

use crate::{
    client::{Client, Error},
    proto::v1::{self as pb, session_event::Body, watch_events_response::Message, EventType},
};

/// How many recent drops are remembered to judge validations still in flight.
const RECENT_DROPS: usize = 8192;

/// Settings of a [`CachedValidator`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Most tokens kept; past it, an arbitrary entry makes room.
    pub max_entries: usize,
    /// An entry is checked with the service again at least this often, whatever its deadlines.
    pub max_age: Duration,
    /// Subtracted from the session's deadlines to allow for clock skew between hosts.
    pub clock_margin: Duration,
    /// Whether a validation through the service slides the idle deadline. Answers from memory
    /// never reach the service, so they cannot.
    pub touch: bool,
    /// Silence on the stream longer than this means the connection is dead: the cache stops
    /// answering from memory and reconnects. Keep it above the server's heartbeat interval (15 s by
    /// default).
    pub stale_after: Duration,
    /// First wait before reconnecting; doubles up to 5 s.
    pub reconnect_delay: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 100_000,
            max_age: Duration::from_secs(300),
            clock_margin: Duration::from_secs(1),
            touch: true,
            stale_after: Duration::from_secs(40),
            reconnect_delay: Duration::from_millis(100),
        }
    }
}

/// Why cached tokens were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionCause {
    Revoked,
    Expired,
    Rotated,
}

/// A drop the cache applied, for callers that hold state of their own per session (open
/// websockets, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// One session's event: its tokens are gone from the cache (`entries` of them were cached).
    Session {
        session_id: String,
        sequence: u64,
        cause: EvictionCause,
        entries: usize,
    },
    /// Everything was dropped: the stream was lost beyond resuming.
    All { entries: usize },
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    /// Whether answers may come from memory right now.
    pub live: bool,
    /// The last event sequence applied.
    pub cursor: Option<u64>,
}

type Now = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Validates tokens, from memory when it safely can. See the module docs for the guarantee.
/// Dropping it stops its stream.
pub struct CachedValidator {
    inner: Arc<Inner>,
    follower: JoinHandle<()>,
}

struct Inner {
    client: Client,
    config: CacheConfig,
    state: Mutex<State>,
    live: watch::Sender<bool>,
    evictions: broadcast::Sender<Eviction>,
    now: Now,
}

impl CachedValidator {
    /// Starts following the event stream (on the current tokio runtime). Until it is live, every
    /// validation goes to the service; [`CachedValidator::ready`] waits for it.
    ///
    /// # Panics
    /// Outside a tokio runtime, as `tokio::spawn` does.
    pub fn start(client: Client, config: CacheConfig) -> Self {
        Self::start_with_clock(client, config, Arc::new(SystemTime::now))
    }

    /// As [`CachedValidator::start`], with the clock that deadlines are compared against.
    pub fn start_with_clock(client: Client, config: CacheConfig, now: Now) -> Self {
        let inner = Arc::new(Inner {
            client,
            config,
            state: Mutex::new(State::default()),
            live: watch::Sender::new(false),
            evictions: broadcast::Sender::new(1024),
            now,
        });
        let follower = tokio::spawn(follow(inner.clone()));
        CachedValidator { inner, follower }
    }

    /// The live session `token` belongs to. `Err` with [`Error::is_invalid_session`] means the
    /// token is no good; other errors mean the service could not be asked.
    pub async fn validate(&self, token: &str) -> Result<Arc<pb::Session>, Error> {
        let key = TokenKey::of(token);
        let asked_at = (self.inner.now)();
        let ticket = match self.inner.lock().lookup(&key, asked_at) {
            Lookup::Hit(session) => return Ok(session),
            Lookup::Miss(ticket) => ticket,
        };
        let session = Arc::new(
            self.inner
                .client
                .validate(token, self.inner.config.touch)
                .await?,
        );
        if let (Some(ticket), Some(until)) = (ticket, self.valid_until(&session, asked_at)) {
            let max = self.inner.config.max_entries;
            self.inner
                .lock()
                .admit(ticket, key, session.clone(), until, max);
        }
        Ok(session)
    }

    /// Waits until answers may come from memory (the stream is connected and caught up).
    pub async fn ready(&self) {
        let mut live = self.inner.live.subscribe();
        // The sender lives in `inner`, which `self` keeps: this cannot fail.
        let _ = live.wait_for(|l| *l).await;
    }

    /// Every drop from now on.
    pub fn evictions(&self) -> broadcast::Receiver<Eviction> {
        self.inner.evictions.subscribe()
    }

    pub fn stats(&self) -> CacheStats {
        self.inner.lock().stats()
    }

    /// When a reply stops being servable: the earlier deadline less the margin, capped by
    /// `max_age`. `None` if the reply lacks a deadline (then it is not cached).
    fn valid_until(&self, session: &pb::Session, asked_at: SystemTime) -> Option<SystemTime> {
        let idle = to_system_time(session.idle_expires_at.as_ref()?)?;
        let absolute = to_system_time(session.absolute_expires_at.as_ref()?)?;
        let mut deadline = idle.min(absolute);
        if let Some(token_ends) = session.bound_token_expires_at.as_ref() {
            // A bound token dies before its session: past it the device must refresh.
            deadline = deadline.min(to_system_time(token_ends)?);
        }
        let deadline = deadline.checked_sub(self.inner.config.clock_margin)?;
        Some(deadline.min(asked_at + self.inner.config.max_age))
    }
}

impl Drop for CachedValidator {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps half-changed in a way that makes them unsafe to
        // read; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_live(&self, live: bool) {
        self.lock().live = live;
        self.live.send_replace(live);
    }

    /// Notes the epoch of a message; if the log changed timelines under the cache (a restore),
    /// nothing cached can be trusted, whatever the server accepted as a cursor.
    fn follow_epoch(&self, epoch: u64) {
        let reset = self.lock().follow_epoch(epoch);
        if let Some(entries) = reset {
            let _ = self.evictions.send(Eviction::All { entries });
        }
    }

    fn apply(&self, item: pb::WatchEventsResponse) {
        let epoch = match &item.message {
            Some(Message::Heartbeat(h)) => h.log_epoch,
            Some(Message::Event(e)) => e.log_epoch,
            None => 0,
        };
        // 0: a server from before epochs existed.
        if epoch != 0 {
            self.follow_epoch(epoch);
        }
        match item.message {
            Some(Message::Heartbeat(h)) => {
                self.lock().cursor = Some(h.delivered_through);
                // With `announce_live`, the first heartbeat comes once the replay is done.
                if !*self.live.borrow() {
                    self.set_live(true);
                }
            }
            Some(Message::Event(e)) => {
                let cause = match e.body {
                    Some(Body::Revoked(_)) => Some(EvictionCause::Revoked),
                    Some(Body::Expired(_)) => Some(EvictionCause::Expired),
                    Some(Body::Rotated(_)) => Some(EvictionCause::Rotated),
                    _ => None,
                };
                let mut state = self.lock();
                state.cursor = Some(e.sequence);
                if let Some(cause) = cause {
                    let entries = state.drop_session(&e.session_id);
                    drop(state);
                    let _ = self.evictions.send(Eviction::Session {
                        session_id: e.session_id,
                        sequence: e.sequence,
                        cause,
                        entries,
                    });
                }
            }
            None => {}
        }
    }

    /// The stream ended with `status`: stop answering from memory; forget everything if what was
    /// missed cannot be replayed.
    fn lost(&self, status: &Status) {
        let mut state = self.lock();
        state.live = false;
        if status.code() == Code::OutOfRange || state.cursor.is_none() {
            state.cursor = None;
            state.epoch = None;
            let entries = state.clear();
            drop(state);
            let _ = self.evictions.send(Eviction::All { entries });
        } else {
            drop(state);
        }
        self.live.send_replace(false);
    }
}

/// Follows the event stream for as long as the validator lives, resuming after every break.
async fn follow(inner: Arc<Inner>) {
    let mut delay = inner.config.reconnect_delay;
    loop {
        let (after_sequence, log_epoch) = {
            let state = inner.lock();
            (state.cursor, state.cursor.and(state.epoch))
        };
        let request = pb::WatchEventsRequest {
            after_sequence,
            log_epoch,
            filter: Some(pb::EventFilter {
                event_types: vec![
                    EventType::Revoked as i32,
                    EventType::Expired as i32,
                    EventType::Rotated as i32,
                ],
                ..Default::default()
            }),
            announce_live: true,
        };
        let ended = match inner.client.events().watch_events(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match tokio::time::timeout(inner.config.stale_after, stream.message()).await {
                        Ok(Ok(Some(item))) => {
                            inner.apply(item);
                            delay = inner.config.reconnect_delay;
                        }
                        Ok(Ok(None)) => break Status::unavailable("the event stream ended"),
                        Ok(Err(status)) => break status,
                        Err(_) => break Status::unavailable("the event stream went silent"),
                    }
                }
            }
            Err(status) => status,
        };
        inner.lost(&ended);
        tracing::warn!(code = ?ended.code(), message = ended.message(), "session event stream lost; answering from the service until it resumes");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn to_system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// A token's keyed hash: SipHash-1-3 with 128 bits of output, under a key drawn once per
/// process from the OS's randomness. The cache never holds tokens themselves, and without the key
/// nobody can make two tokens share an entry. (It was SHA-256, a fifth of a hit's time.)
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct TokenKey(u128);

impl TokenKey {
    fn of(token: &str) -> Self {
        use siphasher::sip128::{Hasher128, SipHasher13};
        static KEY: OnceLock<(u64, u64)> = OnceLock::new();
        let (k0, k1) = *KEY.get_or_init(|| {
            // std's RandomState is seeded from the OS's randomness; two of them give 128 bits.
            let (a, b) = (RandomState::new(), RandomState::new());
            (a.hash_one(0x5e55_1011u64), b.hash_one(0xca11_ab1eu64))
        });
        let mut h = SipHasher13::new_with_keys(k0, k1);
        h.write(token.as_bytes());
        TokenKey(h.finish128().as_u128())
    }
}

impl std::hash::Hash for TokenKey {
    /// The value is already a keyed hash: its low bits place the entry (no second hash).
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 as u64);
    }
}

/// Passes a [`TokenKey`]'s bits through as the table's hash.
#[derive(Default, Clone, Copy)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `TokenKey`; kept correct for anything else.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type ByToken = HashMap<TokenKey, Entry, BuildHasherDefault<PassThrough>>;

struct Entry {
    session: Arc<pb::Session>,
    /// Nanoseconds since the Unix epoch: 8 bytes where a `SystemTime` takes 16, so that a table
    /// slot (with its 16-byte key) is half a cache line, and a hit's slot is more often in cache.
    valid_until: u64,
}

/// `t` in nanoseconds since the Unix epoch (0 before it, saturating in the year 2554).
fn epoch_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Where a miss stood when it went to the service, to judge its answer when it comes back.
#[derive(Clone, Copy, Debug)]
struct Ticket {
    generation: u64,
    drops: u64,
}

enum Lookup {
    Hit(Arc<pb::Session>),
    /// The ticket is `None` when the answer must not be cached (the stream is not live).
    Miss(Option<Ticket>),
}

#[derive(Default)]
struct State {
    entries: ByToken,
    by_session: HashMap<String, Vec<TokenKey>>,
    live: bool,
    cursor: Option<u64>,
    /// The log epoch `cursor` belongs to: sent with it, and compared with every message's.
    epoch: Option<u64>,
    /// Bumped by every reset.
    generation: u64,
    /// How many session drops have been applied; `recent` holds the latest with their numbers.
    drops: u64,
    recent: VecDeque<(u64, String)>,
    hits: u64,
    misses: u64,
}

impl State {
    fn lookup(&mut self, key: &TokenKey, now: SystemTime) -> Lookup {
        if self.live {
            match self.entries.get(key) {
                Some(e) if epoch_nanos(now) < e.valid_until => {
                    self.hits += 1;
                    return Lookup::Hit(e.session.clone());
                }
                Some(_) => self.remove(key),
                None => {}
            }
        }
        self.misses += 1;
        Lookup::Miss(self.live.then_some(Ticket {
            generation: self.generation,
            drops: self.drops,
        }))
    }

    /// Caches an answer unless something happened since `ticket` that could make it stale.
    fn admit(
        &mut self,
        ticket: Ticket,
        key: TokenKey,
        session: Arc<pb::Session>,
        valid_until: SystemTime,
        max_entries: usize,
    ) -> bool {
        if !self.live || ticket.generation != self.generation {
            return false;
        }
        if self.drops != ticket.drops {
            match self.recent.front() {
                // Drops since the ticket were forgotten: cannot tell.
                Some((oldest, _)) if *oldest > ticket.drops + 1 => return false,
                None => return false,
                Some(_) => {}
            }
            let dropped_since = self
                .recent
                .iter()
                .rev()
                .take_while(|(n, _)| *n > ticket.drops)
                .any(|(_, id)| *id == session.session_id);
            if dropped_since {
                return false;
            }
        }
        if max_entries == 0 {
            return false;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= max_entries {
            if let Some(victim) = self.entries.keys().next().copied() {
                self.remove(&victim);
            }
        }
        let session_id = session.session_id.clone();
        let entry = Entry {
            session,
            valid_until: epoch_nanos(valid_until),
        };
        if self.entries.insert(key, entry).is_none() {
            self.by_session.entry(session_id).or_default().push(key);
        }
        true
    }

    /// Forgets every token of `session_id`; how many there were.
    fn drop_session(&mut self, session_id: &str) -> usize {
        self.drops += 1;
        if self.recent.len() == RECENT_DROPS {
            self.recent.pop_front();
        }
        self.recent.push_back((self.drops, session_id.to_owned()));
        let keys = self.by_session.remove(session_id).unwrap_or_default();
        keys.iter()
            .filter(|k| self.entries.remove(k).is_some())
            .count()
    }

    fn remove(&mut self, key: &TokenKey) {
        if let Some(entry) = self.entries.remove(key) {
            let id = &entry.session.session_id;
            if let Some(keys) = self.by_session.get_mut(id) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_session.remove(id);
                }
            }
        }
    }

    /// Notes the log epoch of a message. A change of epoch means a restored log whose sequence
    /// numbers repeat: everything is dropped (returns how many entries were).
    fn follow_epoch(&mut self, epoch: u64) -> Option<usize> {
        let changed = self.epoch.is_some_and(|known| known != epoch);
        self.epoch = Some(epoch);
        changed.then(|| {
            self.cursor = None;
            self.clear()
        })
    }

    fn clear(&mut self) -> usize {
        self.generation += 1;
        let n = self.entries.len();
        self.entries.clear();
        self.by_session.clear();
        n
    }

    fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            entries: self.entries.len(),
            live: self.live,
            cursor: self.cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Arc<pb::Session> {
        Arc::new(pb::Session {
            session_id: id.to_owned(),
            ..Default::default()
        })
    }

    fn live_state() -> State {
        State {
            live: true,
            ..Default::default()
        }
    }

    fn later(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000 + secs)
    }

    #[test]
    fn a_token_key_is_stable_distinct_and_holds_no_token() {
        let token = "sat_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert_eq!(TokenKey::of(token), TokenKey::of(token));
        let keys: std::collections::HashSet<u128> = (0..10_000)
            .map(|i| TokenKey::of(&format!("{token}{i}")).0)
            .collect();
        assert_eq!(keys.len(), 10_000, "no two of 10,000 tokens share a key");
        let shown = format!("{:?}", TokenKey::of(token));
        assert!(!shown.contains("AAAA"), "{shown}");
    }

    fn ticket(state: &mut State, key: &TokenKey) -> Ticket {
        match state.lookup(key, later(0)) {
            Lookup::Miss(Some(t)) => t,
            Lookup::Miss(None) => panic!("no ticket while live"),
            Lookup::Hit(_) => panic!("unexpected hit"),
        }
    }

    #[test]
    fn a_miss_is_cached_and_then_hits_until_its_deadline() {
        let mut s = live_state();
        let key = TokenKey::of("t1");
        let t = ticket(&mut s, &key);
        assert!(s.admit(t, key, session("a"), later(10), 10));
        assert!(matches!(s.lookup(&key, later(9)), Lookup::Hit(_)));
        assert!(matches!(s.lookup(&key, later(10)), Lookup::Miss(_)));
        assert_eq!(s.entries.len(), 0, "an expired entry is removed");
        assert!(s.by_session.is_empty());
    }

    #[test]
    fn nothing_is_served_or_cached_while_not_live() {
        let mut s = live_state();
        let key = TokenKey::of("t1");
        let t = ticket(&mut s, &key);
        assert!(s.admit(t, key, session("a"), later(10), 10));
        s.live = false;
        assert!(matches!(s.lookup(&key, later(1)), Lookup::Miss(None)));
        assert!(!s.admit(t, TokenKey::of("t2"), session("b"), later(10), 10));
        s.live = true;
        assert!(
            matches!(s.lookup(&key, later(1)), Lookup::Hit(_)),
            "entries survive a resumable break"
        );
    }

    #[test]
    fn an_answer_that_raced_its_sessions_drop_is_not_cached() {
        let mut s = live_state();
        let key = TokenKey::of("t1");
        let t = ticket(&mut s, &key);
        s.drop_session("other");
        s.drop_session("a");
        assert!(!s.admit(t, key, session("a"), later(10), 10));
        // Another session's drop does not spoil an answer.
        let t = ticket(&mut s, &key);
        s.drop_session("other");
        assert!(s.admit(t, key, session("a"), later(10), 10));
    }

    #[test]
    fn an_answer_is_refused_when_the_drops_since_its_ticket_were_forgotten() {
        let mut s = live_state();
        let key = TokenKey::of("t1");
        let t = ticket(&mut s, &key);
        for i in 0..RECENT_DROPS + 1 {
            s.drop_session(&format!("s{i}"));
        }
        assert!(!s.admit(t, key, session("a"), later(10), 10));
    }

    #[test]
    fn a_reset_drops_everything_and_spoils_answers_in_flight() {
        let mut s = live_state();
        let k1 = TokenKey::of("t1");
        let t = ticket(&mut s, &k1);
        assert!(s.admit(t, k1, session("a"), later(10), 10));
        let k2 = TokenKey::of("t2");
        let t2 = ticket(&mut s, &k2);
        assert_eq!(s.clear(), 1);
        assert!(!s.admit(t2, k2, session("b"), later(10), 10));
        assert!(matches!(s.lookup(&k1, later(1)), Lookup::Miss(_)));
    }

    #[test]
    fn a_new_log_epoch_drops_everything_and_spoils_answers_in_flight() {
        let mut s = live_state();
        assert_eq!(s.follow_epoch(7), None, "the first epoch seen");
        let key = TokenKey::of("t1");
        let t = ticket(&mut s, &key);
        assert!(s.admit(t, key, session("a"), later(10), 10));
        let in_flight = ticket(&mut s, &TokenKey::of("t2"));
        s.cursor = Some(42);
        assert_eq!(s.follow_epoch(7), None, "same epoch");
        assert_eq!(s.follow_epoch(8), Some(1), "a restored log");
        assert!(s.entries.is_empty());
        assert_eq!(s.cursor, None, "the old cursor means nothing now");
        assert!(!s.admit(in_flight, TokenKey::of("t2"), session("b"), later(10), 10));
    }

    #[test]
    fn every_token_of_a_dropped_session_goes() {
        let mut s = live_state();
        let (k1, k2) = (TokenKey::of("old"), TokenKey::of("new"));
        let t = ticket(&mut s, &k1);
        assert!(s.admit(t, k1, session("a"), later(10), 10));
        assert!(s.admit(t, k2, session("a"), later(10), 10));
        assert_eq!(s.drop_session("a"), 2);
        assert!(s.entries.is_empty() && s.by_session.is_empty());
    }

    #[test]
    fn the_size_limit_holds() {
        let mut s = live_state();
        for i in 0..5 {
            let k = TokenKey::of(&format!("t{i}"));
            let t = ticket(&mut s, &k);
            assert!(s.admit(t, k, session(&format!("s{i}")), later(10), 3));
        }
        assert_eq!(s.entries.len(), 3);
        assert_eq!(s.by_session.len(), 3);
    }
}
