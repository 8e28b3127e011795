//! The embedded sled backend.
//!
//! # Write path: one writer, one flusher (group commit)
//!
//! Every write is a [`Command`] sent to a single **writer thread**. It applies each command as one
//! atomic `sled::Batch` holding the session record, its index entries and its events, so the log
//! and the state can never disagree. Being the only writer, it needs no transactions to make
//! read-modify-write operations (limit enforcement, rotation) safe: commands are serialised.
//!
//! Applied commands go to a single **flusher thread**. It takes everything applied so far, calls
//! `flush()` once, then publishes the events and answers every caller in that group. While it
//! flushes, the writer keeps applying the next commands, which the next flush will cover. This is
//! why throughput grows with concurrency instead of being one fsync per call. (sled 0.34.7's
//! `flush_async` deadlocks with several calls in flight; it is never used.)
//!
//! Readers (validate, get, list) read the tree directly. They may see a change shortly before it
//! is durable; that is safe: a created session's token reaches nobody before its reply, and a
//! revoke seen early only errs on the side of refusing. Event replay, which must never show an
//! event that a crash could take back, reads only up to the durable head.
//!
//! sled's `flush()` ends in `sync_file_range` on Linux. That survives a process crash but not
//! power loss: it neither flushes the drive's write cache nor persists the metadata of the growing
//! log file. So after each flush the flusher also calls `fdatasync` on sled's data file, once per
//! group, so an acknowledged write survives power loss too.
//!
//! If a flush fails, the store answers every pending caller with an error, marks itself
//! unhealthy and refuses further writes: after an I/O error it cannot know what reached the disk,
//! and only a restart (which recovers a consistent prefix) can.

use std::{
    collections::{HashMap, HashSet},
    ops::Bound,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc, Arc, Mutex, RwLock,
    },
    thread::JoinHandle,
};

use tokio::sync::{mpsc, oneshot};

use super::{
    keys::{self, UserEntry},
    records,
    session_cache::{Change, SessionCache},
    touch_log::{self, TouchLog},
    CreateOutcome, CreateRules, Defence, Defended, ListPage, ListScope, LogBounds, PolicyChange,
    PolicyOf, RecordFate, RevokeOutcome, RevokeTarget, RotateOutcome, Rotation, SessionStore,
    UserStatePage,
};
use crate::{
    clock::Timestamp,
    error::{Error, Result},
    events::EventBus,
    model::login::Login,
    model::{
        audit::AuditEntry,
        event::Event,
        plan::{Plan, Planner, View},
        policy::Policy,
        session::{Location, RevokeReason, Session},
        travel::{LastSeen, TravelRules},
    },
    token::SessionId,
};

/// sled's errors become the service's storage errors here, so no other module knows sled. An I/O
/// error is a failed disk: sled may have lost a write of its log, also under a read (a read can
/// merge or split nodes of the tree, which writes).
impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(_) => Error::StorageFailed(e.to_string()),
            _ => Error::Storage(e.to_string()),
        }
    }
}

/// Writes queued for the writer before callers wait for room. Large enough to absorb bursts,
/// small enough that a stalled disk pushes back instead of growing memory.
const COMMAND_QUEUE: usize = 16_384;
/// Most events one prune command deletes, so one command never holds the writer for long.
const PRUNE_CHUNK: usize = 10_000;

/// A session store in a sled database in one directory.
pub struct SledStore {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    db: sled::Db,
    /// sled's log file, kept open to `fdatasync` it after each flush.
    data_file: std::fs::File,
    tree: sled::Tree,
    bus: Arc<EventBus>,
    healthy: AtomicBool,
    /// See [`SessionStore::installation_secret`].
    secret: [u8; 32],
    /// See [`SessionStore::log_epoch`].
    log_epoch: u64,
    /// How long an ended session's tombstone is kept.
    tombstone_retention: std::time::Duration,
    /// Touches waiting for the writer. Reads apply them on top of the tree, so a validate right
    /// after a touch sees the deadline the touch's reply promised. The writer takes them all at
    /// once (`Op::DrainTouches`), at most `TOUCH_DELAY` after the first, so touches cost the
    /// writer one wake-up per round rather than one each. Bounded by `MAX_QUEUED_TOUCHES`.
    /// A read-write lock: every validate reads it, while touches (at most one per session per
    /// `touch_interval`) rarely write it.
    queued_touches: RwLock<HashMap<SessionId, Timestamp>>,
    /// Set while a drain of `queued_touches` is scheduled and not yet begun.
    drain_scheduled: AtomicBool,
    /// Session records for reads; the writer writes through it (see `session_cache`).
    cache: SessionCache,
    /// Where touches write last uses (see `touch_log`).
    log: TouchLog,
}

/// The queue of touches, for reading. As with `Shared::touches`, a poisoned lock is still usable.
fn queued(
    touches: &RwLock<HashMap<SessionId, Timestamp>>,
) -> std::sync::RwLockReadGuard<'_, HashMap<SessionId, Timestamp>> {
    touches.read().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    // The map holds plain values; a panic elsewhere cannot leave it half-updated, so a poisoned
    // lock is still usable.
    fn touches(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SessionId, Timestamp>> {
        self.queued_touches
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The writer, after applying (or failing) a touch: the tree now answers for it. Keeps a newer
    /// queued touch of the same session.
    fn touch_applied(&self, id: SessionId, at: Timestamp) {
        let mut touches = self.touches();
        if touches.get(&id).is_some_and(|queued| *queued <= at) {
            touches.remove(&id);
        }
    }

    /// A session as stored, with any queued touch applied.
    fn read_session(&self, id: &SessionId) -> Result<Option<Session>> {
        // The queued touch first, the record second. The writer applies a touch to the tree (and
        // drops the cached record) before it removes the queued touch, so read in this order one
        // of the two always has it. The other order could see the record from before the touch
        // and then no queued touch, and call a session used a moment ago idle.
        let queued = queued(&self.queued_touches).get(id).copied();
        let mut session = match self.cache.get(id, |r| decode_cached(*id, r)) {
            Some(cached) => Some(cached?.0),
            None => {
                let ticket = self.cache.before_read();
                match read_stored(&self.tree, &self.log, id)? {
                    None => None,
                    Some((session, filed, record)) => {
                        if let Some(ticket) = ticket {
                            self.cache.fill(ticket, *id, &cached(&record, filed));
                        }
                        Some(session)
                    }
                }
            }
        };
        if let (Some(s), Some(at)) = (session.as_mut().filter(|s| s.is_active()), queued) {
            s.last_seen_at = s.last_seen_at.max(at);
        }
        Ok(session)
    }
}

enum Op {
    Create {
        session: Box<Session>,
        rules: CreateRules,
    },
    Enforce {
        ids: Vec<SessionId>,
        policy: Arc<Policy>,
        now: Timestamp,
    },
    Observe {
        id: SessionId,
        location: Location,
        now: Timestamp,
        rules: TravelRules,
    },
    PutPolicy {
        tenant_id: String,
        change: PolicyChange,
    },
    EnforcementDone {
        tenant_id: String,
        mark: u64,
    },
    Audit(Box<AuditEntry>),
    /// Copy the whole tree to a backup file; no other write can interleave.
    Snapshot(std::path::PathBuf),
    Rotate {
        id: SessionId,
        rotation: Rotation,
        policy: Arc<Policy>,
        now: Timestamp,
    },
    Revoke {
        target: RevokeTarget,
        reason: RevokeReason,
        now: Timestamp,
    },
    Defend {
        id: SessionId,
        defence: Defence,
        policy: Arc<Policy>,
        now: Timestamp,
    },
    Sweep {
        ids: Vec<SessionId>,
        policy_of: PolicyOf,
        now: Timestamp,
    },
    Prune {
        older_than: Timestamp,
        keep: u64,
    },
    /// One touch, within a drain.
    Touch {
        id: SessionId,
        now: Timestamp,
    },
    /// Applies every queued touch (see `Shared::queued_touches`).
    DrainTouches,
    PurgeUserState {
        older_than: Timestamp,
        now: Timestamp,
        cursor: Option<Vec<u8>>,
        limit: usize,
    },
    PruneAudit {
        older_than: Timestamp,
        keep: u64,
        limit: usize,
    },
    /// Put the next sessions after `after` into the cache (see `warm_cache`). Writes nothing.
    Warm {
        after: Option<SessionId>,
    },
    /// Stop after everything queued before it is durable.
    Close,
}

enum Outcome {
    Created(CreateOutcome),
    Observed(Box<Session>),
    PolicyPut(Box<(bool, Option<Policy>)>),
    Rotated(Box<RotateOutcome>),
    Revoked(RevokeOutcome),
    Defended(Box<Defended>),
    Count(usize),
    Purged(Box<UserStatePage>),
    /// Where warming goes on from; `None` when it is done.
    Warmed(Option<SessionId>),
    Nothing,
}

type Reply = oneshot::Sender<Result<Outcome>>;

struct Command {
    op: Op,
    reply: Option<Reply>,
}

/// A command applied to the tree but not yet flushed.
struct Pending {
    reply: Option<Reply>,
    outcome: Result<Outcome>,
    events: Vec<Event>,
    head: u64,
}

impl SledStore {
    /// Touches answered for but not written yet (the writer takes them every `TOUCH_DELAY`).
    pub fn queued_touches(&self) -> usize {
        queued(&self.shared.queued_touches).len()
    }

    /// The log of last uses (`store::touch_log`): sessions in its index, and entries in its rounds
    /// (superseded and stale ones included, until cleaning drops them).
    pub fn last_use_log(&self) -> (usize, usize) {
        (self.shared.log.len(), self.shared.log.entries())
    }

    /// Opens (or creates) the store in `dir`. Refuses a directory that holds anything but a
    /// session-authority store, so it never starts empty over someone's data.
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        session_cache_bytes: u64,
        event_buffer: usize,
        tombstone_retention: std::time::Duration,
    ) -> Result<Self> {
        check_dir(dir)?;
        let marker = read_marker(dir)?;
        let db = open_sled(dir, cache_bytes)?;
        let tree = db.open_tree("authority")?;
        check_format(&db, &tree, dir, marker.is_some())?;
        check_identity(&db, &tree, dir, marker)?;
        let secret = read_or_make_secret(&db, &tree)?;
        let log_epoch = read_or_make_log_epoch(&db, &tree)?;
        let head = read_head(&tree)?;
        let log = TouchLog::open(&tree)?;
        let data_file = std::fs::File::open(dir.join("db")).map_err(|e| {
            Error::DataDir(format!("{}: cannot open the data file: {e}", dir.display()))
        })?;
        let bus = Arc::new(EventBus::new(event_buffer, head));
        let shared = Arc::new(Shared {
            db,
            data_file,
            tree,
            bus,
            healthy: AtomicBool::new(true),
            secret,
            log_epoch,
            tombstone_retention,
            queued_touches: RwLock::new(HashMap::new()),
            drain_scheduled: AtomicBool::new(false),
            cache: SessionCache::new(usize::try_from(session_cache_bytes).unwrap_or(usize::MAX)),
            log,
        });

        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (pending_tx, pending_rx) = std_mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer_loop(&shared, command_rx, pending_tx, head))
                .map_err(|e| Error::Storage(format!("cannot start writer thread: {e}")))?
        };
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-flusher".into())
                .spawn(move || flusher_loop(&shared, pending_rx))
                .map_err(|e| Error::Storage(format!("cannot start flusher thread: {e}")))?
        };
        let warmer = commands.clone();
        std::thread::Builder::new()
            .name("store-warmer".into())
            .spawn(move || warm_until_full(&warmer))
            .map_err(|e| Error::Storage(format!("cannot start the cache warmer: {e}")))?;
        Ok(Self {
            shared,
            commands,
            threads: Mutex::new(vec![writer, flusher]),
        })
    }

    /// Writes restored entries into a new store in `dir` (which must not hold one), with the
    /// identity marker of the store they came from. Records (version 2) get their indexes and
    /// the format marker rebuilt here; a keyspace (version 1) is written as it is.
    pub fn restore_entries(
        dir: &Path,
        version: super::snapshot::Version,
        entries: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| Error::DataDir(format!("{}: {e}", dir.display())))?;
        let tree = db.open_tree("authority")?;
        if !tree.is_empty() {
            return Err(Error::DataDir(format!(
                "{} already holds a store",
                dir.display()
            )));
        }
        for chunk in entries.chunks(10_000) {
            let mut batch = sled::Batch::default();
            for (k, v) in chunk {
                if version == super::snapshot::Version::Keyspace {
                    // Its format marker is among the entries: opening the store migrates it.
                    batch.insert(k.as_slice(), v.as_slice());
                    continue;
                }
                match keys::fold_user_record(k) {
                    Some(folded) => batch.insert(folded, v.as_slice()),
                    None => batch.insert(k.as_slice(), v.as_slice()),
                }
                index_restored(&mut batch, k, v)?;
            }
            tree.apply_batch(batch)?;
        }
        if version == super::snapshot::Version::Records {
            tree.insert(keys::META_FORMAT, keys::FORMAT_VALUE)?;
        }
        // A new timeline: the log continues from the backup's head, so its sequence numbers
        // repeat ones that the original store may have handed out after the backup.
        tree.insert(keys::META_LOG_EPOCH, &random_nonzero_u64()?.to_be_bytes())?;
        db.flush()?;
        let id = tree
            .get(keys::META_STORE_ID)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .ok_or_else(|| Error::DataDir("the backup has no store id".into()))?;
        write_marker(dir, &id)
    }

    /// Sends a command and waits until it is durable.
    async fn submit(&self, op: Op) -> Result<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command {
                op,
                reply: Some(tx),
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        // A dropped reply means the writer stopped before taking the command: nothing was applied.
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Queues a command nobody waits for; dropped when the queue is full.
    fn submit_lazily(&self, op: Op) {
        let _ = self.commands.try_send(Command { op, reply: None });
    }

    fn read_session(&self, id: &SessionId) -> Result<Option<Session>> {
        self.shared.read_session(id)
    }
}

/// Calls a write method and picks the expected outcome out of the shared enum.
macro_rules! expect_outcome {
    ($result:expr, $variant:ident) => {
        match $result? {
            Outcome::$variant(value) => Ok(value),
            _ => Err(Error::Storage(
                "internal: writer answered with the wrong outcome".into(),
            )),
        }
    };
}

impl SessionStore for SledStore {
    fn get(&self, id: &SessionId) -> Result<Option<Session>> {
        self.read_session(id)
    }

    fn list(&self, scope: &ListScope, cursor: Option<&[u8]>, limit: usize) -> Result<ListPage> {
        let (prefix, start) = super::list_start(scope, cursor)?;
        let mut sessions = Vec::with_capacity(limit.min(1024));
        let mut last_key = None;
        let mut more = false;
        for entry in self
            .shared
            .tree
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
        {
            let (key, _) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            let id = match keys::parse_user_entry(&key) {
                Some(UserEntry::Session { id, .. }) => id,
                // Per-user records end each user's range: not sessions, and never a cursor.
                Some(UserEntry::Record { .. }) => continue,
                None => return Err(Error::Storage("corrupt user index key".into())),
            };
            if sessions.len() == limit {
                more = true;
                break;
            }
            if let Some(s) = self.read_session(&id)? {
                sessions.push(s);
            }
            last_key = Some(key.to_vec());
        }
        Ok(ListPage {
            sessions,
            next: if more { last_key } else { None },
        })
    }

    fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<SessionId>> {
        let range = super::due_range(now);
        let mut ids = Vec::new();
        for entry in self.shared.tree.range(range).take(limit) {
            let (key, _) = entry?;
            let (_, id) = keys::parse_deadline(&key)
                .ok_or_else(|| Error::Storage("corrupt deadline index key".into()))?;
            ids.push(id);
        }
        Ok(ids)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let head = self.shared.bus.durable_head();
        if after >= head {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        let range = keys::event(after.saturating_add(1))..=keys::event(head);
        for entry in self.shared.tree.range(range).take(limit) {
            let (key, value) = entry?;
            let seq = keys::parse_event(&key)
                .ok_or_else(|| Error::Storage("corrupt event key".into()))?;
            events.push(records::decode_event(seq, &value)?);
        }
        Ok(events)
    }

    fn visit_events_since(&self, since: Timestamp, visit: &mut dyn FnMut(&Event)) -> Result<()> {
        let head = self.shared.bus.durable_head();
        let range = keys::event(0)..=keys::event(head);
        for entry in self.shared.tree.range(range).rev() {
            let (key, value) = entry?;
            let seq = keys::parse_event(&key)
                .ok_or_else(|| Error::Storage("corrupt event key".into()))?;
            let event = records::decode_event(seq, &value)?;
            if event.occurred_at < since {
                break;
            }
            visit(&event);
        }
        Ok(())
    }

    fn log_bounds(&self) -> Result<LogBounds> {
        let head = self.shared.bus.durable_head();
        let first = match self.shared.tree.scan_prefix([keys::EVENT]).next() {
            Some(entry) => {
                let (key, _) = entry?;
                keys::parse_event(&key)
                    .ok_or_else(|| Error::Storage("corrupt event key".into()))?
                    .min(head + 1)
            }
            None => head + 1,
        };
        Ok(LogBounds { first, head })
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.shared.db.size_on_disk()?)
    }

    fn cache_stats(&self) -> Option<super::CacheStats> {
        Some(self.shared.cache.stats())
    }

    fn events(&self) -> Arc<EventBus> {
        self.shared.bus.clone()
    }

    fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    async fn create(&self, session: Session, rules: CreateRules) -> Result<CreateOutcome> {
        let op = Op::Create {
            session: Box::new(session),
            rules,
        };
        expect_outcome!(self.submit(op).await, Created)
    }

    async fn enforce(
        &self,
        ids: Vec<SessionId>,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> Result<usize> {
        expect_outcome!(self.submit(Op::Enforce { ids, policy, now }).await, Count)
    }

    async fn observe(
        &self,
        id: SessionId,
        location: Location,
        now: Timestamp,
        rules: TravelRules,
    ) -> Result<Session> {
        let op = Op::Observe {
            id,
            location,
            now,
            rules,
        };
        expect_outcome!(self.submit(op).await, Observed).map(|b| *b)
    }

    fn last_seen(&self, tenant_id: &str, user_id: &str) -> Result<Option<LastSeen>> {
        read_last_seen(&self.shared.tree, tenant_id, user_id)
    }

    fn policies(&self) -> Result<Vec<(String, Policy)>> {
        let mut out = Vec::new();
        for entry in self.shared.tree.scan_prefix([keys::POLICY]) {
            let (key, value) = entry?;
            let tenant = String::from_utf8(key[1..].to_vec())
                .map_err(|_| Error::Storage("corrupt policy key".into()))?;
            out.push((tenant, records::decode_policy(&value)?));
        }
        Ok(out)
    }

    async fn put_policy(
        &self,
        tenant_id: String,
        change: PolicyChange,
    ) -> Result<(bool, Option<Policy>)> {
        expect_outcome!(
            self.submit(Op::PutPolicy { tenant_id, change }).await,
            PolicyPut
        )
        .map(|b| *b)
    }

    fn pending_enforcements(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in self.shared.tree.scan_prefix([keys::ENFORCE]) {
            let (key, _) = entry?;
            out.push(
                String::from_utf8(key[1..].to_vec())
                    .map_err(|_| Error::Storage("corrupt enforcement key".into()))?,
            );
        }
        Ok(out)
    }

    fn enforcement_pending(&self, tenant_id: &str) -> Result<Option<u64>> {
        let key = keys::per_tenant(keys::ENFORCE, tenant_id);
        Ok(match self.shared.tree.get(key)? {
            Some(v) => {
                Some(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                    Error::Storage("corrupt enforcement mark".into())
                })?))
            }
            None => None,
        })
    }

    async fn enforcement_done(&self, tenant_id: String, mark: u64) -> Result<()> {
        self.submit(Op::EnforcementDone { tenant_id, mark })
            .await
            .map(drop)
    }

    fn installation_secret(&self) -> [u8; 32] {
        self.shared.secret
    }

    fn log_epoch(&self) -> u64 {
        self.shared.log_epoch
    }

    async fn snapshot(&self, path: std::path::PathBuf) -> Result<u64> {
        expect_outcome!(self.submit(Op::Snapshot(path)).await, Count).map(|n| n as u64)
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64> {
        expect_outcome!(self.submit(Op::Audit(Box::new(entry))).await, Count).map(|n| n as u64)
    }

    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        let start = keys::audit(after.saturating_add(1));
        let end = keys::audit(u64::MAX);
        for entry in self.shared.tree.range(start..=end).take(limit) {
            let (_, value) = entry?;
            out.push(
                serde_json::from_slice(&value)
                    .map_err(|_| Error::Storage("corrupt audit record".into()))?,
            );
        }
        Ok(out)
    }

    async fn rotate(
        &self,
        id: SessionId,
        rotation: Rotation,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> Result<RotateOutcome> {
        let op = Op::Rotate {
            id,
            rotation,
            policy,
            now,
        };
        expect_outcome!(self.submit(op).await, Rotated).map(|b| *b)
    }

    async fn revoke(
        &self,
        target: RevokeTarget,
        reason: RevokeReason,
        now: Timestamp,
    ) -> Result<RevokeOutcome> {
        let op = Op::Revoke {
            target,
            reason,
            now,
        };
        expect_outcome!(self.submit(op).await, Revoked)
    }

    async fn defend(
        &self,
        id: SessionId,
        defence: Defence,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> Result<Defended> {
        let op = Op::Defend {
            id,
            defence,
            policy,
            now,
        };
        expect_outcome!(self.submit(op).await, Defended).map(|b| *b)
    }

    async fn sweep(
        &self,
        ids: Vec<SessionId>,
        policy_of: PolicyOf,
        now: Timestamp,
    ) -> Result<usize> {
        expect_outcome!(
            self.submit(Op::Sweep {
                ids,
                policy_of,
                now
            })
            .await,
            Count
        )
    }

    async fn prune_events(&self, older_than: Timestamp, keep: u64) -> Result<usize> {
        expect_outcome!(self.submit(Op::Prune { older_than, keep }).await, Count)
    }

    async fn purge_user_state(
        &self,
        older_than: Timestamp,
        now: Timestamp,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<UserStatePage> {
        let op = Op::PurgeUserState {
            older_than,
            now,
            cursor,
            limit,
        };
        expect_outcome!(self.submit(op).await, Purged).map(|b| *b)
    }

    async fn prune_audit(&self, older_than: Timestamp, keep: u64, limit: usize) -> Result<usize> {
        expect_outcome!(
            self.submit(Op::PruneAudit {
                older_than,
                keep,
                limit
            })
            .await,
            Count
        )
    }

    fn touch(&self, id: SessionId, now: Timestamp) {
        {
            let mut touches = self.shared.touches();
            if touches.len() >= MAX_QUEUED_TOUCHES && !touches.contains_key(&id) {
                // The writer is this far behind: the touch is shed, as a full queue shed it before.
                return;
            }
            let at = touches.entry(id).or_insert(now);
            *at = (*at).max(now);
        }
        if self.shared.drain_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let drain = || Command {
            op: Op::DrainTouches,
            reply: None,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let commands = self.commands.clone();
                runtime.spawn(async move {
                    tokio::time::sleep(TOUCH_DELAY).await;
                    // Err: the store is closing; its writer drains before it stops.
                    let _ = commands.send(drain()).await;
                });
            }
            // Outside a runtime (a tool driving the store directly): now, and without waiting
            // for room, since nothing here can wait.
            Err(_) => {
                if self.commands.try_send(drain()).is_err() {
                    self.shared.drain_scheduled.store(false, Ordering::Release);
                }
            }
        }
    }

    fn end_soon(&self, id: SessionId, policy: Arc<Policy>, now: Timestamp) {
        self.submit_lazily(Op::Enforce {
            ids: vec![id],
            policy,
            now,
        });
    }

    async fn close(&self) -> Result<()> {
        // Err: already closed. Either way, then wait for the threads.
        let _ = self.submit(Op::Close).await;
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .map_err(|e| Error::Storage(format!("store threads did not stop cleanly: {e}")))?;
        self.shared.db.flush()?;
        self.shared
            .data_file
            .sync_data()
            .map_err(|e| Error::Storage(format!("final sync failed: {e}")))
    }
}

// === opening ===

/// Refuses a non-empty directory that sled did not write (it would otherwise start an empty store
/// among someone's files).
fn check_dir(dir: &Path) -> Result<()> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::DataDir(format!("{}: {e}", dir.display()))),
    };
    let non_empty = entries.next().is_some();
    if non_empty && !dir.join("conf").exists() {
        return Err(Error::DataDir(format!(
            "{} is not empty and is not a session-authority store",
            dir.display()
        )));
    }
    Ok(())
}

/// Checks the format marker; writes it into a brand-new store, and brings an earlier format's
/// store up to this one.
fn check_format(db: &sled::Db, tree: &sled::Tree, dir: &Path, marked: bool) -> Result<()> {
    let upgraded_from = match tree.get(keys::META_FORMAT)? {
        // A move of per-user records cut short by a crash goes on (see `fold_user_records`).
        Some(v) if v.as_ref() == keys::FORMAT_VALUE => None,
        Some(v) if v.as_ref() == keys::FORMAT_VALUE_4 => Some(4),
        // Format 2 is format 4 without last uses.
        Some(v) if v.as_ref() == keys::FORMAT_VALUE_2 => Some(2),
        Some(v) if v.as_ref() == keys::FORMAT_VALUE_3 => {
            // Marked anew only once every last use is moved (see `migrate_format_3`).
            let migrated = touch_log::migrate_format_3(tree)?;
            tracing::info!(dir = %dir.display(), last_uses = migrated, "store format 3: last uses moved into rounds");
            Some(3)
        }
        Some(v) => {
            return Err(Error::DataDir(format!(
                "{} holds an incompatible store format {:?}: written by a later release? Back \
                 it up with that release (`session-authority backup`), restore the file with this \
                 one (`session-authority restore`)",
                dir.display(),
                String::from_utf8_lossy(&v)
            )))
        }
        // sled treats damage as a torn write and may recover an empty database: the marker file
        // outside sled says there was a store here, so this is corruption, not a new store.
        None if marked => {
            return Err(Error::DataDir(format!(
                "{} has a {STORE_ID_FILE} but its store is empty or unreadable: the data is \
                 corrupt; restore it from a backup (the service will not start empty over it)",
                dir.display()
            )))
        }
        None => {
            let foreign_trees = db
                .tree_names()
                .iter()
                .any(|n| n.as_ref() != b"__sled__default" && n.as_ref() != b"authority");
            if !tree.is_empty() || !db.is_empty() || foreign_trees {
                return Err(Error::DataDir(format!(
                    "{} holds a sled database that is not a session-authority store",
                    dir.display()
                )));
            }
            tree.insert(keys::META_FORMAT, keys::FORMAT_VALUE)?;
            db.flush()?;
            return Ok(());
        }
    };
    if upgraded_from.is_some() {
        // Marked first: a release that knows only format 4 must refuse a half-moved store.
        tree.insert(keys::META_FORMAT, keys::FORMAT_VALUE)?;
        db.flush()?;
    }
    let moved = fold_user_records(tree)?;
    if moved > 0 {
        db.flush()?;
    }
    if let Some(from) = upgraded_from {
        tracing::info!(dir = %dir.display(), from, per_user_records = moved, "store format upgraded to 5");
    } else if moved > 0 {
        tracing::info!(dir = %dir.display(), per_user_records = moved, "store format 5: finished moving per-user records");
    }
    Ok(())
}

/// Moves per-user records from their own maps (format 4) to the end of their user's range
/// (`keys::user_records`), a bounded chunk to each atomic batch. A crash between chunks leaves
/// some moved and the rest where they were; the next open goes on. A key too damaged to name
/// its user stays where it is, unread, as it was. Returns the count moved.
fn fold_user_records(tree: &sled::Tree) -> Result<usize> {
    let mut moved = 0;
    for kind in keys::USER_RECORD_KINDS {
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for entry in tree.scan_prefix([kind]) {
            let (key, value) = entry?;
            let Some(folded) = keys::fold_user_record(&key) else {
                tracing::warn!("a damaged per-user record key was left where it was");
                continue;
            };
            batch.insert(folded, value);
            batch.remove(key);
            in_batch += 1;
            if in_batch == FOLD_CHUNK {
                tree.apply_batch(std::mem::take(&mut batch))?;
                moved += in_batch;
                in_batch = 0;
            }
        }
        tree.apply_batch(batch)?;
        moved += in_batch;
    }
    Ok(moved)
}

/// Per-user records moved by one batch of `fold_user_records`.
const FOLD_CHUNK: usize = 10_000;

/// A file beside sled's own, naming the store. It outlives damage to sled's log, so an empty
/// recovery cannot pass for a new store, and it catches directories mixed up between stores.
const STORE_ID_FILE: &str = "store.id";

fn read_marker(dir: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(dir.join(STORE_ID_FILE)) {
        Ok(id) => Ok(Some(id.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::DataDir(format!(
            "{}: {e}",
            dir.join(STORE_ID_FILE).display()
        ))),
    }
}

/// Matches the marker file with the id inside the store; gives a new store both.
fn check_identity(
    db: &sled::Db,
    tree: &sled::Tree,
    dir: &Path,
    marker: Option<String>,
) -> Result<()> {
    let inside = tree
        .get(keys::META_STORE_ID)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    match (marker, inside) {
        (Some(m), Some(i)) if m == i => Ok(()),
        (Some(m), Some(i)) => Err(Error::DataDir(format!(
            "{}: {STORE_ID_FILE} names store {m} but the data is store {i}: files from two stores were mixed",
            dir.display()
        ))),
        (Some(_), None) => Err(Error::DataDir(format!(
            "{}: the store lost its identity record: the data is corrupt; restore it from a backup",
            dir.display()
        ))),
        (None, Some(i)) => {
            // Our data, intact; only the marker was removed. Put it back.
            tracing::warn!(store_id = %i, "{STORE_ID_FILE} was missing; recreating it");
            write_marker(dir, &i)
        }
        (None, None) => {
            let mut raw = [0u8; 16];
            getrandom::fill(&mut raw)
                .map_err(|e| Error::Storage(format!("no randomness from the OS: {e}")))?;
            let id = hex::encode(raw);
            tree.insert(keys::META_STORE_ID, id.as_bytes())?;
            db.flush()?;
            write_marker(dir, &id)
        }
    }
}

fn write_marker(dir: &Path, id: &str) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| {
        Error::DataDir(format!("{}: writing {STORE_ID_FILE}: {e}", dir.display()))
    };
    let path = dir.join(STORE_ID_FILE);
    let mut file = std::fs::File::create(&path).map_err(io)?;
    file.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    // The directory entry too, or a crash could lose the file.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Adds the index entries of a restored record: a session's deadline entry, and its user entry
/// while it is active.
fn index_restored(batch: &mut sled::Batch, key: &[u8], value: &[u8]) -> Result<()> {
    if key.first() != Some(&keys::SESSION) {
        return Ok(());
    }
    let id = SessionId::from_slice(&key[1..])
        .ok_or_else(|| Error::DataDir("the backup holds a damaged session key".into()))?;
    let s = records::decode_session(id, value)?;
    batch.insert(&keys::deadline(s.next_deadline(), &s.id)[..], &[][..]);
    if s.is_active() {
        batch.insert(
            keys::user_session(&s.tenant_id, &s.user_id, s.created_at, &s.id),
            &[][..],
        );
    }
    Ok(())
}

/// The installation secret: made from the OS's randomness when the store is new.
fn read_or_make_secret(db: &sled::Db, tree: &sled::Tree) -> Result<[u8; 32]> {
    if let Some(v) = tree.get(keys::META_SECRET)? {
        return v
            .as_ref()
            .try_into()
            .map_err(|_| Error::Storage("corrupt installation secret".into()));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| Error::Storage(format!("no randomness from the OS: {e}")))?;
    tree.insert(keys::META_SECRET, &secret[..])?;
    db.flush()?;
    Ok(secret)
}

/// A random u64, never 0: log epochs (0 reads as "none" to a client) and enforcement marks.
fn random_nonzero_u64() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Storage(format!("no randomness from the OS: {e}")))?;
    Ok(u64::from_be_bytes(bytes).max(1))
}

/// The log epoch; made on first open (also of a store written before epochs existed).
fn read_or_make_log_epoch(db: &sled::Db, tree: &sled::Tree) -> Result<u64> {
    let stored = read_u64(tree, keys::META_LOG_EPOCH)?;
    if stored != 0 {
        return Ok(stored);
    }
    let epoch = random_nonzero_u64()?;
    tree.insert(keys::META_LOG_EPOCH, &epoch.to_be_bytes())?;
    db.flush()?;
    Ok(epoch)
}

/// The newest sequence ever assigned: the last event's, or the one recorded by the last prune
/// (which may have emptied the log), whichever is greater.
fn read_head(tree: &sled::Tree) -> Result<u64> {
    let recorded = read_u64(tree, keys::META_HEAD)?;
    let last_event = match tree.scan_prefix([keys::EVENT]).next_back() {
        Some(entry) => {
            let (key, _) = entry?;
            keys::parse_event(&key).ok_or_else(|| Error::Storage("corrupt event key".into()))?
        }
        None => 0,
    };
    Ok(recorded.max(last_event))
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64> {
    match tree.get(key)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| Error::Storage("corrupt meta record".into()))?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

fn read_last_seen(tree: &sled::Tree, tenant: &str, user: &str) -> Result<Option<LastSeen>> {
    match tree.get(keys::user_record(keys::LAST_SEEN, tenant, user))? {
        None => Ok(None),
        Some(bytes) => records::decode_last_seen(&bytes).map(Some),
    }
}

/// Opens sled in `dir`. A store that was dropped a moment ago in this process (one refused after
/// opening, say) keeps its file lock until sled's background thread winds down, up to its 500 ms
/// flush tick (longer under load); wait that out rather than refuse. Another process holding the
/// lock is still an error, after the wait.
fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db> {
    // 10 s: on a loaded two-core machine the previous store's threads took over 3 s to let go
    // (a test restarting a server in-process failed on it twice).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(Error::DataDir(format!(
                    "{}: {e} (is another server running on this directory?)",
                    dir.display()
                )))
            }
            other => return other.map_err(|e| Error::DataDir(format!("{}: {e}", dir.display()))),
        }
    }
}

/// A session as stored (its record, with a later last use from the last-use log taken in),
/// where its deadline entry is filed if a touch left it behind, and its record as the cache keeps
/// it (see `cached`).
fn read_stored(tree: &sled::Tree, log: &TouchLog, id: &SessionId) -> Result<Option<Stored>> {
    // The log first, the record second: a full write that lands between the two makes the entry
    // stale, which the record then shows. The other order could take a record from before a full
    // write and find its entry already forgotten.
    let last_use = log.lookup(tree, id)?;
    match tree.get(keys::session(id))? {
        None => Ok(None),
        Some(record) => with_last_use(*id, record, last_use).map(Some),
    }
}

/// `read_stored` for a record already read (as the cache's warming reads them, in key order), on
/// the writer (so nothing writes between the two reads).
fn stored(tree: &sled::Tree, log: &TouchLog, id: SessionId, record: sled::IVec) -> Result<Stored> {
    with_last_use(id, record, log.lookup(tree, &id)?)
}

type Stored = (Session, Option<Timestamp>, sled::IVec);

/// `record` with the session's later last use, if one was logged since (re-encoded then), and
/// where that entry says the deadline entry is filed. An entry not after the record's own last
/// use is stale: a full write took it in (see `touch_log`).
fn with_last_use(
    id: SessionId,
    record: sled::IVec,
    last_use: Option<records::LastUse>,
) -> Result<Stored> {
    let mut session = records::decode_session(id, &record)?;
    let Some(last_use) = last_use else {
        return Ok((session, None, record));
    };
    if !counts(&session, &last_use) {
        return Ok((session, None, record));
    }
    session.last_seen_at = last_use.at;
    let merged = records::encode_session(&session).into();
    Ok((session, Some(last_use.filed), merged))
}

/// Whether a logged last use still counts for the session as its record stands: not once a full
/// write took it in (the record's last use is as late), nor for an ended session.
fn counts(session: &Session, last_use: &records::LastUse) -> bool {
    session.is_active() && last_use.at > session.last_seen_at
}

/// Whether a logged last use is stale against the session's stored record (or its absence).
fn is_stale(tree: &sled::Tree, id: &SessionId, last_use: &records::LastUse) -> Result<bool> {
    Ok(match tree.get(keys::session(id))? {
        None => true,
        Some(record) => !counts(&records::decode_session(*id, &record)?, last_use),
    })
}

// === what the cache holds ===

/// A session as the session cache holds it: its record as reads see it (any later last use taken
/// in), then, when a touch left its deadline entry behind, the last use that entry is filed under
/// (the `filed` of its entry in the last-use log; 8 bytes, big-endian milliseconds), then one byte
/// saying whether that position is there. The writer must know the position to move the entry
/// whenever it writes the session; carried here, a touch of a cached session reads nothing from
/// the tree (reading the position was 37% of the writer's time at a million sessions).
fn cached(record: &[u8], filed: Option<Timestamp>) -> Box<[u8]> {
    let mut out = Vec::with_capacity(record.len() + 9);
    out.extend_from_slice(record);
    match filed {
        Some(at) => {
            out.extend_from_slice(&at.as_millis().to_be_bytes());
            out.push(1);
        }
        None => out.push(0),
    }
    out.into_boxed_slice()
}

/// The session and its filed position (`None`: its deadline entry is where its record says).
fn decode_cached(id: SessionId, bytes: &[u8]) -> Result<(Session, Option<Timestamp>)> {
    let (record, filed) = split_cached(bytes)?;
    Ok((records::decode_session(id, record)?, filed))
}

/// The record and the filed position of a `cached` form.
fn split_cached(bytes: &[u8]) -> Result<(&[u8], Option<Timestamp>)> {
    let corrupt = || Error::Storage("corrupt cached session".into());
    let (&flag, rest) = bytes.split_last().ok_or_else(corrupt)?;
    match flag {
        0 => Ok((rest, None)),
        1 => {
            let at = rest.len().checked_sub(8).ok_or_else(corrupt)?;
            let (record, millis) = rest.split_at(at);
            let millis = u64::from_be_bytes(millis.try_into().map_err(|_| corrupt())?);
            Ok((record, Some(Timestamp::from_millis(millis))))
        }
        _ => Err(corrupt()),
    }
}

// === warming the cache ===

/// Sessions one warming command reads: about a millisecond of the writer's time, so writes queued
/// behind it hardly wait.
const WARM_CHUNK: usize = 1_024;

/// Fills the session cache from the tree, a chunk at a time through the writer, until every live
/// session is in or the cache is full. Reads served meanwhile miss and read sled, as before.
/// Stops quietly when the store closes or fails.
fn warm_until_full(commands: &mpsc::Sender<Command>) {
    let started = std::time::Instant::now();
    let mut after = None;
    loop {
        let (reply, answer) = oneshot::channel();
        let op = Op::Warm { after };
        if commands
            .blocking_send(Command {
                op,
                reply: Some(reply),
            })
            .is_err()
        {
            return;
        }
        match answer.blocking_recv() {
            Ok(Ok(Outcome::Warmed(Some(next)))) => after = Some(next),
            Ok(Ok(Outcome::Warmed(None))) => break,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "warming the session cache stopped");
                return;
            }
            _ => return,
        }
    }
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "session cache warmed"
    );
}

/// One chunk of warming, on the writer (the only thread that changes sessions, so what it reads
/// from the tree is what the cache may hold): the live sessions after `after`. Returns where to go
/// on from, or `None` when done or full.
fn warm_cache(
    tree: &sled::Tree,
    log: &TouchLog,
    cache: &SessionCache,
    after: Option<SessionId>,
) -> Result<Option<SessionId>> {
    let start = match after {
        Some(id) => Bound::Excluded(keys::session(&id).to_vec()),
        None => Bound::Included(vec![keys::SESSION]),
    };
    let end = Bound::Excluded(vec![keys::SESSION + 1]);
    let mut last = None;
    for (n, entry) in tree.range::<Vec<u8>, _>((start, end)).enumerate() {
        if n == WARM_CHUNK {
            return Ok(last);
        }
        let (key, record) = entry?;
        let id = SessionId::from_slice(&key[1..])
            .ok_or_else(|| Error::Storage("corrupt session key".into()))?;
        let (session, filed, record) = stored(tree, log, id, record)?;
        if session.is_active() && !cache.warm(id, &cached(&record, filed)) {
            return Ok(None);
        }
        last = Some(id);
    }
    Ok(None)
}

// === the writer ===

/// Most creations applied as one sled batch. sled's cost is mostly per batch (its log
/// reservation and page updates), so queued creations share one.
const MAX_CREATE_GROUP: usize = 64;
/// Most touches applied in one transaction of a drain.
const MAX_TOUCH_GROUP: usize = touch_log::MAX_ROUND;
/// How long touches gather before the writer takes them. Every validate of a session not used for
/// `touch_interval` makes one; at a million sessions they come by the ten thousand per second, and
/// waking the writer for each cost more than writing it (a context switch each way, on the cores
/// that serve the calls). A touch is visible to reads at once; this delays only its write.
const TOUCH_DELAY: std::time::Duration = std::time::Duration::from_millis(10);
/// Most touches waiting for the writer; past it, new ones are shed (see `SledStore::touch`).
const MAX_QUEUED_TOUCHES: usize = 1 << 18;

/// Held by the writer and the flusher: if either dies by a panic (sled's own asserts included),
/// the store can no longer take writes, and every write would fail as "shutting down" while
/// health still said SERVING. Marking it unhealthy makes health say so, as after an I/O error.
struct UnhealthyIfPanicking<'a>(&'a AtomicBool);

impl Drop for UnhealthyIfPanicking<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::Release);
            tracing::error!("a store thread panicked; refusing further writes");
        }
    }
}

fn writer_loop(
    shared: &Shared,
    mut commands: mpsc::Receiver<Command>,
    pending: std_mpsc::Sender<Pending>,
    mut head: u64,
) {
    let _guard = UnhealthyIfPanicking(&shared.healthy);
    let mut carried = None;
    loop {
        let Some(first) = carried.take().or_else(|| commands.blocking_recv()) else {
            break;
        };
        let (group, next) = gather(first, &mut commands);
        carried = next;
        if group.len() > 1 {
            if !apply_group(shared, group, &pending, &mut head) {
                break;
            }
            continue;
        }
        let Some(Command { op, reply }) = group.into_iter().next() else {
            continue;
        };
        if matches!(op, Op::Close) {
            // Touches still waiting are written first, so a clean stop keeps them.
            drain_touches(shared, &mut head);
            // Answered by the flusher after a final flush of everything before it.
            let _ = pending.send(Pending {
                reply,
                outcome: Ok(Outcome::Nothing),
                events: Vec::new(),
                head,
            });
            break;
        }
        if !shared.healthy.load(Ordering::Acquire) {
            refuse(reply);
            continue;
        }
        if matches!(op, Op::DrainTouches) {
            drain_touches(shared, &mut head);
            continue;
        }
        if let Op::Warm { after } = op {
            // Nothing to make durable: answered here, not by the flusher.
            let warmed =
                warm_cache(&shared.tree, &shared.log, &shared.cache, after).map(Outcome::Warmed);
            if let Some(reply) = reply {
                let _ = reply.send(warmed);
            }
            continue;
        }
        let mut tx = Tx::new(shared, head);
        let result = tx.run(op);
        let (outcome, events) = match tx.commit() {
            Ok((new_head, events)) => {
                head = new_head;
                (result, events)
            }
            Err(e) => (Err(e), Vec::new()),
        };
        if pending
            .send(Pending {
                reply,
                outcome,
                events,
                head,
            })
            .is_err()
        {
            break;
        }
    }
    // Commands still queued are dropped here; their callers see ShuttingDown, with nothing applied.
}

/// What makes a command able to share a batch with the commands queued behind it.
#[derive(PartialEq, Eq, Hash)]
enum Sharing {
    /// A creation, for this user.
    Create(String, String),
    /// A rotation or a defence (a DBSC refresh, a reuse or drift verdict) of this session.
    Session(SessionId),
}

fn sharing(op: &Op) -> Option<Sharing> {
    match op {
        Op::Create { session, .. } => Some(Sharing::Create(
            session.tenant_id.clone(),
            session.user_id.clone(),
        )),
        Op::Rotate { id, .. } | Op::Defend { id, .. } => Some(Sharing::Session(*id)),
        _ => None,
    }
}

/// `first` and the commands queued right behind it that may share its batch: creations for
/// distinct users (up to `MAX_CREATE_GROUP`), touches of distinct sessions (up to
/// `MAX_TOUCH_GROUP`), or rotations and defences of distinct sessions (up to `MAX_CREATE_GROUP`).
/// Each reads only its own user's or session's keys (a creation also its fresh random id), so applying them one after another in one batch reads exactly what applying them in
/// separate batches would. The first command that does not fit is handed back.
fn gather(
    first: Command,
    commands: &mut mpsc::Receiver<Command>,
) -> (Vec<Command>, Option<Command>) {
    let Some(kind) = sharing(&first.op) else {
        return (vec![first], None);
    };
    let max = MAX_CREATE_GROUP;
    let same_kind = std::mem::discriminant(&kind);
    let mut seen = HashSet::from([kind]);
    let mut group = vec![first];
    while group.len() < max {
        let Ok(next) = commands.try_recv() else {
            break;
        };
        let fits = sharing(&next.op)
            .is_some_and(|k| std::mem::discriminant(&k) == same_kind && seen.insert(k));
        if !fits {
            return (group, Some(next));
        }
        group.push(next);
    }
    (group, None)
}

/// Applies every queued touch, `MAX_TOUCH_GROUP` to a transaction, then takes each out of the
/// queue (unless a newer touch of its session came meanwhile). A touch ends nothing and emits no
/// event, so nothing goes to the flusher: its writes ride the next flush, another command's or
/// sled's own (every 500 ms), as RELIABILITY.md says of last use.
fn drain_touches(shared: &Shared, head: &mut u64) {
    // Cleared before the queue is read: a touch queued after the read schedules the next drain.
    shared.drain_scheduled.store(false, Ordering::Release);
    let due: Vec<(SessionId, Timestamp)> = queued(&shared.queued_touches)
        .iter()
        .map(|(id, at)| (*id, *at))
        .collect();
    for chunk in due.chunks(MAX_TOUCH_GROUP) {
        if !shared.healthy.load(Ordering::Acquire) {
            // Kept queued: reads still see them, and nothing more can be written.
            return;
        }
        let mut tx = Tx::new(shared, *head);
        for &(id, now) in chunk {
            if let Err(e) = tx.run(Op::Touch { id, now }) {
                tracing::warn!(session = %id, error = %e, "touch not applied");
            }
        }
        if let Ok((new_head, _)) = tx.commit() {
            *head = new_head;
        }
        for &(id, at) in chunk {
            shared.touch_applied(id, at);
        }
    }
    if let Err(e) = shared.log.clean(&shared.tree, |id, last_use| {
        is_stale(&shared.tree, id, last_use)
    }) {
        // Left as it was: the next drain tries again.
        tracing::warn!(error = %e, "cleaning the last-use log failed");
    }
}

/// Applies a group (see `gather`) as one batch; each command keeps its own outcome. False once
/// the flusher is gone.
fn apply_group(
    shared: &Shared,
    group: Vec<Command>,
    pending: &std_mpsc::Sender<Pending>,
    head: &mut u64,
) -> bool {
    if !shared.healthy.load(Ordering::Acquire) {
        group.into_iter().for_each(|c| refuse(c.reply));
        return true;
    }
    let mut tx = Tx::new(shared, *head);
    let mut results = Vec::with_capacity(group.len());
    for Command { op, reply } in group {
        results.push((reply, tx.run(op)));
    }
    let (committed, mut events) = match tx.commit() {
        Ok((new_head, events)) => {
            *head = new_head;
            (Ok(()), events)
        }
        Err(e) => (Err(e), Vec::new()),
    };
    for (reply, result) in results {
        let outcome = match &committed {
            Ok(()) => result,
            Err(e) => Err(Error::Storage(e.to_string())),
        };
        // The group's events travel with its first reply; the flusher publishes them all before
        // it answers any.
        let sent = pending.send(Pending {
            reply,
            outcome,
            events: std::mem::take(&mut events),
            head: *head,
        });
        if sent.is_err() {
            return false;
        }
    }
    true
}

fn refuse(reply: Option<Reply>) {
    if let Some(reply) = reply {
        let _ = reply.send(Err(Error::Storage(
            "store failed earlier; restart the service".into(),
        )));
    }
}

fn flusher_loop(shared: &Shared, pending: std_mpsc::Receiver<Pending>) {
    let _guard = UnhealthyIfPanicking(&shared.healthy);
    while let Ok(first) = pending.recv() {
        let mut group = vec![first];
        while let Ok(more) = pending.try_recv() {
            group.push(more);
        }
        let started = std::time::Instant::now();
        let durable = shared
            .db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| shared.data_file.sync_data().map_err(|e| e.to_string()));
        crate::metrics::flush(started.elapsed().as_secs_f64(), group.len());
        match durable {
            Ok(()) => {
                let head = group.iter().map(|p| p.head).max().unwrap_or(0);
                let events = group
                    .iter_mut()
                    .flat_map(|p| std::mem::take(&mut p.events))
                    .collect();
                // Publish before answering, so a caller that waits for its event's sequence finds
                // it already on its way to subscribers.
                shared.bus.publish(events, head);
                for p in group {
                    if let Some(reply) = p.reply {
                        let _ = reply.send(p.outcome);
                    }
                }
            }
            Err(e) => {
                shared.healthy.store(false, Ordering::Release);
                tracing::error!(error = %e, "store flush failed; refusing further writes");
                for p in group {
                    if let Some(reply) = p.reply {
                        let _ = reply.send(Err(Error::Storage(format!("flush failed: {e}"))));
                    }
                }
            }
        }
    }
}

/// One command's changes, gathered into one atomic batch.
struct Tx<'a> {
    tree: &'a sled::Tree,
    cache: &'a SessionCache,
    queued_touches: &'a RwLock<HashMap<SessionId, Timestamp>>,
    healthy: &'a AtomicBool,
    /// What this batch does to each session it writes, in order, for the cache.
    changed: Vec<Change>,
    /// Set while a touch's plan is applied: its puts change the last use only.
    touching: bool,
    /// For sessions read in this batch that have a last use newer than their record: the last
    /// use their deadline entry is filed under (see `keys`). A `RefCell` because planners read
    /// through `&self`; only the writer thread has a `Tx`.
    filed: std::cell::RefCell<HashMap<SessionId, Timestamp>>,
    /// Sessions this batch writes in full.
    written: HashSet<SessionId>,
    batch: sled::Batch,
    log: &'a TouchLog,
    /// The last uses this batch writes: one round of the log at commit. When they are all it
    /// writes, the round goes in as a single insert, not a batch: a sled batch forces its log
    /// buffer out to disk (a write on sled's thread pool) while single inserts share the buffer
    /// until the next flush.
    last_uses: Vec<(SessionId, records::LastUse)>,
    /// Sessions this batch writes in full that had a logged last use, now stale.
    unlogged: Vec<SessionId>,
    events: Vec<Event>,
    head: u64,
    /// Set by any write other than a last use.
    dirty: bool,
    tombstone_retention: std::time::Duration,
}

impl<'a> Tx<'a> {
    fn new(shared: &'a Shared, head: u64) -> Self {
        Self {
            tree: &shared.tree,
            cache: &shared.cache,
            queued_touches: &shared.queued_touches,
            healthy: &shared.healthy,
            changed: Vec::new(),
            touching: false,
            filed: Default::default(),
            written: HashSet::new(),
            batch: sled::Batch::default(),
            log: &shared.log,
            last_uses: Vec::new(),
            unlogged: Vec::new(),
            events: Vec::new(),
            head,
            dirty: false,
            tombstone_retention: shared.tombstone_retention,
        }
    }

    fn commit(self) -> Result<(u64, Vec<Event>)> {
        // The head is not written here: it is the last event's key, read at open. Only pruning,
        // which may delete that key, records it (see `prune`). One key fewer per write matters:
        // sled's cost is per key.
        if self.dirty || !self.last_uses.is_empty() {
            let mut last_uses = self.last_uses;
            let round = (!last_uses.is_empty()).then(|| self.log.round(&mut last_uses));
            self.cache.write_begins();
            let applied = if self.dirty {
                let mut batch = self.batch;
                if let Some(round) = &round {
                    touch_log::add_to(&mut batch, round);
                }
                self.tree.apply_batch(batch)
            } else {
                round
                    .as_ref()
                    .map_or(Ok(()), |round| touch_log::apply(self.tree, round))
            };
            // Inside the cache's bracket: a reader that misses after it sees the log as written.
            if applied.is_ok() {
                self.log.forget(&self.unlogged);
            }
            if let Some(round) = round {
                match applied {
                    Ok(()) => self.log.written(round),
                    Err(_) => self.log.not_written(round),
                }
            }
            self.cache.write_ends(self.changed, applied.is_ok());
            if let Err(e) = applied {
                // sled fails a batch when an earlier write of its log failed (a full disk, say):
                // as after a failed flush, nothing written since can be trusted to be on disk.
                self.healthy.store(false, Ordering::Release);
                tracing::error!(error = %e, "store write failed; refusing further writes");
                return Err(e.into());
            }
        }
        Ok((self.head, self.events))
    }

    /// Runs one command into the batch. A failed disk under its reads fails the store as a failed
    /// write does (see `commit`): otherwise every later command could fail the same way while
    /// health still said SERVING.
    fn run(&mut self, op: Op) -> Result<Outcome> {
        let result = self.run_op(op);
        if let Err(Error::StorageFailed(e)) = &result {
            self.healthy.store(false, Ordering::Release);
            tracing::error!(error = %e, "store read failed; refusing further writes");
        }
        result
    }

    fn run_op(&mut self, op: Op) -> Result<Outcome> {
        match op {
            Op::Create { session, rules } => self
                .plan(|p| p.create(*session, rules))
                .map(Outcome::Created),
            Op::Enforce { ids, policy, now } => self
                .plan(|p| p.enforce(ids, &policy, now))
                .map(Outcome::Count),
            Op::Observe {
                id,
                location,
                now,
                rules,
            } => self
                .plan(|p| p.observe(id, location, now, rules))
                .map(|s| Outcome::Observed(Box::new(s))),
            Op::PutPolicy { tenant_id, change } => self
                .put_policy(&tenant_id, &change)
                .map(|put| Outcome::PolicyPut(Box::new(put))),
            Op::EnforcementDone { tenant_id, mark } => {
                let key = keys::per_tenant(keys::ENFORCE, &tenant_id);
                if self.tree.get(&key)?.as_deref() == Some(&mark.to_be_bytes()[..]) {
                    self.batch.remove(key);
                    self.dirty = true;
                }
                Ok(Outcome::Nothing)
            }
            Op::Audit(entry) => self.audit(*entry).map(|id| Outcome::Count(id as usize)),
            Op::Snapshot(path) => self.snapshot(&path).map(|n| Outcome::Count(n as usize)),
            Op::Rotate {
                id,
                rotation,
                policy,
                now,
            } => self
                .plan(|p| p.rotate(id, rotation, &policy, now))
                .map(|r| Outcome::Rotated(Box::new(r))),
            Op::Revoke {
                target,
                reason,
                now,
            } => self
                .plan(|p| p.revoke(target, reason, now))
                .map(Outcome::Revoked),
            Op::Defend {
                id,
                defence,
                policy,
                now,
            } => self
                .plan(|p| p.defend(id, defence, &policy, now))
                .map(|d| Outcome::Defended(Box::new(d))),
            Op::Sweep {
                ids,
                policy_of,
                now,
            } => {
                let swept = self.plan(|p| p.sweep(ids.clone(), &policy_of, now))?;
                self.refile(&ids)?;
                Ok(Outcome::Count(swept))
            }
            Op::Prune { older_than, keep } => self.prune(older_than, keep).map(Outcome::Count),
            Op::Touch { id, now } => {
                self.touching = true;
                let touched = self.plan(|p| p.touch(id, now)).map(|()| Outcome::Nothing);
                self.touching = false;
                touched
            }
            Op::PurgeUserState {
                older_than,
                now,
                cursor,
                limit,
            } => self
                .purge_user_state(older_than, now, cursor, limit)
                .map(|page| Outcome::Purged(Box::new(page))),
            Op::PruneAudit {
                older_than,
                keep,
                limit,
            } => self
                .prune_audit(older_than, keep, limit)
                .map(Outcome::Count),
            // Both are answered by `writer_loop` itself and never reach a batch.
            Op::Close | Op::Warm { .. } | Op::DrainTouches => Ok(Outcome::Nothing),
        }
    }

    /// Runs a planner against the tree as it was before this batch, and puts its plan in the
    /// batch: also when the planner refused (its plan may still end sessions, see
    /// `model::plan`), but not after a storage error.
    fn plan<T>(&mut self, write: impl FnOnce(&mut Planner<'_, Self>) -> Result<T>) -> Result<T> {
        let mut planner = Planner::new(&*self, Plan::new(self.head, self.tombstone_retention));
        let result = write(&mut planner);
        let plan = planner.plan;
        if !result.as_ref().is_err_and(Error::is_storage) {
            self.apply(plan);
        }
        result
    }

    /// Translates a plan into sled keys: records, their indexes, per-user records, events.
    fn apply(&mut self, plan: Plan) {
        for (old, new) in &plan.sessions {
            self.put(old.as_ref(), new.as_ref());
        }
        for (tenant, user, seen) in &plan.last_seen {
            self.batch.insert(
                keys::user_record(keys::LAST_SEEN, tenant, user),
                records::encode_last_seen(seen),
            );
            self.dirty = true;
        }
        for (tenant, user, creations) in &plan.creations {
            self.batch.insert(
                keys::user_record(keys::CREATIONS, tenant, user),
                records::encode_creations(creations),
            );
            self.dirty = true;
        }
        for (tenant, user, logins) in &plan.logins {
            self.batch.insert(
                keys::user_record(keys::LOGINS, tenant, user),
                records::encode_logins(logins),
            );
            self.dirty = true;
        }
        for event in plan.events {
            self.batch.insert(
                &keys::event(event.sequence)[..],
                records::encode_event(&event),
            );
            self.events.push(event);
            self.dirty = true;
        }
        self.head = plan.head;
    }

    /// Writes `new` in place of `old`, moving index entries: the user index holds active sessions
    /// only, the deadline index every session under its next deadline. `None` deletes.
    fn put(&mut self, old: Option<&Session>, new: Option<&Session>) {
        if let (true, Some(old), Some(new)) = (self.touching, old, new) {
            return self.put_last_use(old, new);
        }
        if let Some(old) = old {
            self.written.insert(old.id);
            // The record written below (or its deletion) takes in any later last use, and the
            // deadline entry moves from where it was filed.
            let filed = self.filed.borrow_mut().remove(&old.id);
            if filed.is_some() {
                self.unlogged.push(old.id);
            }
            let filed_deadline = match filed {
                Some(at) => Session {
                    last_seen_at: at,
                    ..old.clone()
                }
                .next_deadline(),
                None => old.next_deadline(),
            };
            self.batch
                .remove(&keys::deadline(filed_deadline, &old.id)[..]);
            if old.is_active() {
                self.batch.remove(keys::user_session(
                    &old.tenant_id,
                    &old.user_id,
                    old.created_at,
                    &old.id,
                ));
            }
            if new.is_none() {
                self.batch.remove(&keys::session(&old.id)[..]);
                self.changed.push((old.id, None));
            }
        }
        if let Some(new) = new {
            let record = records::encode_session(new);
            self.batch.insert(&keys::session(&new.id)[..], &record[..]);
            // Live sessions go through to the cache; ended ones leave it (a read puts a tombstone
            // back if one is asked for), so that it spends its bytes on sessions that validate.
            // The full write makes any logged last use stale: the deadline entry is filed where
            // the record says.
            self.changed
                .push((new.id, new.is_active().then(|| cached(&record, None))));
            self.batch
                .insert(&keys::deadline(new.next_deadline(), &new.id)[..], &[][..]);
            if new.is_active() {
                self.batch.insert(
                    keys::user_session(&new.tenant_id, &new.user_id, new.created_at, &new.id),
                    &[][..],
                );
            }
        }
        self.dirty = true;
    }

    /// A touch: only the last use is written; the record and its deadline entry stay, so the
    /// entry may now be early. The sweeper finds such a session due, sees it is not, and re-files
    /// it (`refile`). One small key instead of a record and two index moves.
    fn put_last_use(&mut self, old: &Session, new: &Session) {
        let filed = *self
            .filed
            .borrow_mut()
            .entry(old.id)
            .or_insert(old.last_seen_at);
        let last_use = records::LastUse {
            at: new.last_seen_at,
            filed,
        };
        self.last_uses.push((new.id, last_use));
        self.changed.push((
            new.id,
            Some(cached(&records::encode_session(new), Some(filed))),
        ));
    }

    /// After a sweep: sessions it found due that are live because a touch moved their deadline
    /// without moving their entry are written in full, which files them where they are due.
    fn refile(&mut self, ids: &[SessionId]) -> Result<()> {
        for id in ids {
            if self.written.contains(id) {
                continue;
            }
            if let Some(s) = View::session(&*self, id)? {
                if self.filed.borrow().contains_key(id) && s.is_active() {
                    self.put(Some(&s), Some(&s));
                }
            }
        }
        Ok(())
    }

    /// Copies every entry of the tree to a backup file, in key order.
    fn snapshot(&self, path: &Path) -> Result<u64> {
        let mut out = super::snapshot::SnapshotWriter::create(path)?;
        let io = |e: std::io::Error| Error::Storage(format!("writing {}: {e}", path.display()));
        for entry in self.tree.iter() {
            let (mut key, mut value) = entry?;
            if key.first() == Some(&keys::SESSION) {
                let id = SessionId::from_slice(&key[1..])
                    .ok_or_else(|| Error::Storage("corrupt session key".into()))?;
                value = stored(self.tree, self.log, id, value)?.2;
            }
            // A backup holds per-user records in their maps, as etcd does.
            if let Some(record) = keys::unfold_user_record(&key) {
                key = record.into();
            }
            if super::snapshot::is_record(&key) {
                out.entry(&key, &value).map_err(io)?;
            }
        }
        out.finish().map_err(io)
    }

    /// Appends to the audit trail: the id follows the last one ever stored (the newest kept, or
    /// the newest pruned if pruning emptied the trail).
    fn audit(&mut self, mut entry: AuditEntry) -> Result<u64> {
        let last = match self.tree.scan_prefix([keys::AUDIT]).next_back() {
            Some(e) => audit_id(&e?.0)?,
            None => 0,
        };
        entry.id = last.max(read_u64(self.tree, keys::META_AUDIT_HEAD)?) + 1;
        let value = serde_json::to_vec(&entry)
            .map_err(|e| Error::Storage(format!("encoding an audit record: {e}")))?;
        self.batch.insert(&keys::audit(entry.id)[..], value);
        self.dirty = true;
        Ok(entry.id)
    }

    fn put_policy(
        &mut self,
        tenant_id: &str,
        change: &PolicyChange,
    ) -> Result<(bool, Option<Policy>)> {
        let key = keys::policy(tenant_id);
        let stored = self
            .tree
            .get(&key)?
            .map(|v| records::decode_policy(&v))
            .transpose()?;
        let policy = change(stored.as_ref())?;
        match &policy {
            Some(p) => self.batch.insert(key, records::encode_policy(p)?),
            None => self.batch.remove(key),
        }
        // Its sessions are enforced in the background; until that is done, the mark says so.
        self.batch.insert(
            keys::per_tenant(keys::ENFORCE, tenant_id),
            &random_nonzero_u64()?.to_be_bytes(),
        );
        self.dirty = true;
        Ok((stored.is_some(), policy))
    }

    fn prune(&mut self, older_than: Timestamp, keep: u64) -> Result<usize> {
        let mut pruned = 0;
        for entry in self.tree.scan_prefix([keys::EVENT]).take(PRUNE_CHUNK) {
            let (key, value) = entry?;
            let seq = keys::parse_event(&key)
                .ok_or_else(|| Error::Storage("corrupt event key".into()))?;
            let too_many = self.head.saturating_sub(seq) >= keep;
            let too_old = || -> Result<bool> {
                Ok(records::decode_event(seq, &value)?.occurred_at < older_than)
            };
            if !(too_many || too_old()?) {
                break;
            }
            self.batch.remove(key);
            self.dirty = true;
            pruned += 1;
        }
        if pruned > 0 {
            // The log may now be empty: keep the head where `open` can find it.
            self.batch.insert(keys::META_HEAD, &self.head.to_be_bytes());
        }
        Ok(pruned)
    }

    fn purge_user_state(
        &mut self,
        older_than: Timestamp,
        now: Timestamp,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<UserStatePage> {
        // Per-user records end their user's range (`keys::user_records`): walk the range,
        // stepping over each user's session entries with one seek. `limit` bounds the keys read.
        let end = Bound::Excluded(vec![keys::USER + 1]);
        let mut from = cursor.map_or(Bound::Included(vec![keys::USER]), Bound::Excluded);
        let mut read = 0;
        let mut page = UserStatePage::default();
        while read < limit {
            let mut next = None;
            for entry in self.tree.range::<Vec<u8>, _>((from.clone(), end.clone())) {
                let (key, value) = entry?;
                read += 1;
                match keys::parse_user_entry(&key) {
                    Some(UserEntry::Record { kind, .. }) => {
                        match super::user_record_fate(kind, &value, older_than, now)? {
                            RecordFate::Stale => {
                                self.batch.remove(key.clone());
                                self.dirty = true;
                                page.purged += 1;
                            }
                            RecordFate::Kept(at) => page.kept.extend(at),
                        }
                    }
                    Some(UserEntry::Session { user_end, .. })
                        if key[user_end] < keys::USER_RECORDS_FROM =>
                    {
                        let mut records = key[..user_end].to_vec();
                        records.push(keys::USER_RECORDS_FROM);
                        next = Some(Bound::Included(records));
                        break;
                    }
                    _ => {}
                }
                if read == limit {
                    next = Some(Bound::Excluded(key.to_vec()));
                    break;
                }
            }
            match next {
                Some(n) => from = n,
                // The range ended: the next call starts a new pass.
                None => return Ok(page),
            }
        }
        // No key is a user's prefix and `USER_RECORDS_FROM`, so a seek's target is a cursor too.
        page.next = match from {
            Bound::Included(k) | Bound::Excluded(k) => Some(k),
            Bound::Unbounded => None,
        };
        Ok(page)
    }

    fn prune_audit(&mut self, older_than: Timestamp, keep: u64, limit: usize) -> Result<usize> {
        let mut pruned = 0;
        let mut newest = None;
        let last = match self.tree.scan_prefix([keys::AUDIT]).next_back() {
            Some(entry) => audit_id(&entry?.0)?,
            None => return Ok(0),
        };
        for entry in self.tree.scan_prefix([keys::AUDIT]).take(limit) {
            let (key, value) = entry?;
            let record: AuditEntry = serde_json::from_slice(&value)
                .map_err(|_| Error::Storage("corrupt audit record".into()))?;
            let id = audit_id(&key)?;
            if !super::audit_is_stale(id, record.at, last, older_than, keep) {
                break;
            }
            newest = Some(id);
            self.batch.remove(key);
            pruned += 1;
        }
        if let Some(id) = newest {
            self.batch.insert(keys::META_AUDIT_HEAD, &id.to_be_bytes());
            self.dirty = true;
        }
        Ok(pruned)
    }
}

/// The tree as it was before the batch being built: what planners read.
impl View for Tx<'_> {
    fn session(&self, id: &SessionId) -> Result<Option<Session>> {
        // The cache holds what the tree holds (only this thread writes either), without the walk,
        // with any later last use taken in and where the deadline entry is filed if a touch left
        // it behind (see `put`); on a miss, the session's entry in the last-use log gives both.
        let (mut session, filed) = match self.cache.get(id, |r| decode_cached(*id, r)) {
            Some(cached) => cached?,
            None => match read_stored(self.tree, self.log, id)? {
                None => return Ok(None),
                Some((session, filed, _)) => (session, filed),
            },
        };
        if let Some(at) = filed {
            self.filed.borrow_mut().insert(*id, at);
        }
        // A touch still waiting for its drain counts, as it does for reads: a sweep must not end
        // a session whose use a validate has already answered for. Not while a touch is applied:
        // it would find its own last use already there, and write nothing.
        let queued = if self.touching {
            None
        } else {
            queued(self.queued_touches).get(id).copied()
        };
        if let Some(at) = queued.filter(|at| session.is_active() && *at > session.last_seen_at) {
            // The deadline entry stays where the stored last use filed it (see `put`).
            self.filed
                .borrow_mut()
                .entry(*id)
                .or_insert(session.last_seen_at);
            session.last_seen_at = at;
        }
        Ok(Some(session))
    }

    /// A user's active sessions, by creation time.
    fn user_sessions(&self, tenant: &str, user: &str) -> Result<Vec<Session>> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(keys::user_prefix(tenant, Some(user))) {
            let (key, _) = entry?;
            match keys::parse_user_entry(&key) {
                Some(UserEntry::Session { id, .. }) => {
                    if let Some(s) = self.session(&id)? {
                        out.push(s);
                    }
                }
                // The user's per-user records, after its sessions.
                Some(UserEntry::Record { .. }) => continue,
                None => return Err(Error::Storage("corrupt user index key".into())),
            }
        }
        Ok(out)
    }

    fn last_seen(&self, tenant: &str, user: &str) -> Result<Option<LastSeen>> {
        read_last_seen(self.tree, tenant, user)
    }

    fn creations(&self, tenant: &str, user: &str) -> Result<Vec<Timestamp>> {
        Ok(self
            .tree
            .get(keys::user_record(keys::CREATIONS, tenant, user))?
            .map(|v| records::decode_creations(&v))
            .unwrap_or_default())
    }

    fn logins(&self, tenant: &str, user: &str) -> Result<Vec<Login>> {
        self.tree
            .get(keys::user_record(keys::LOGINS, tenant, user))?
            .map(|v| records::decode_logins(&v))
            .transpose()
            .map(Option::unwrap_or_default)
    }
}

fn audit_id(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key
        .get(1..)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Storage("corrupt audit key".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_seen_at(millis: u64) -> LastSeen {
        LastSeen {
            location: Location::default(),
            at: Timestamp::from_millis(millis),
            session_id: SessionId::from_bytes([7; 16]),
        }
    }

    /// A move of per-user records into their users' ranges that a crash cut short (the store
    /// marked 5, one record moved, one not) finishes at the next open; a key too damaged to
    /// name its user is left as it was, and does not stop the open.
    #[test]
    fn an_interrupted_move_of_per_user_records_finishes_at_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        {
            let db = sled::Config::new().path(&data).open().expect("sled");
            let tree = db.open_tree("authority").expect("tree");
            tree.insert(keys::META_FORMAT, keys::FORMAT_VALUE)
                .expect("mark");
            let moved = records::encode_last_seen(&last_seen_at(1));
            let unmoved = records::encode_last_seen(&last_seen_at(2));
            tree.insert(keys::user_record(keys::LAST_SEEN, "t", "a"), moved)
                .expect("moved");
            tree.insert(keys::per_user(keys::LAST_SEEN, "t", "b"), unmoved)
                .expect("not yet");
            tree.insert(b"lno-zero-bytes", &b"?"[..]).expect("damaged");
            db.flush().expect("flush");
        }
        let store =
            SledStore::open(&data, 1 << 20, 1 << 20, 16, std::time::Duration::ZERO).expect("opens");
        let seen = |user: &str| store.last_seen("t", user).expect("read").map(|l| l.at);
        assert_eq!(seen("a"), Some(Timestamp::from_millis(1)));
        assert_eq!(seen("b"), Some(Timestamp::from_millis(2)));
        let tree = &store.shared.tree;
        let left: Vec<_> = tree
            .scan_prefix([keys::LAST_SEEN])
            .keys()
            .collect::<std::result::Result<_, _>>()
            .expect("scan");
        assert_eq!(left, vec![sled::IVec::from(&b"lno-zero-bytes"[..])]);
    }

    /// The writer and flusher hold this guard: a panic in either must turn health to NOT_SERVING,
    /// while a thread that ends normally (a clean close) leaves health alone.
    #[test]
    fn a_store_thread_that_panics_marks_the_store_unhealthy() {
        let healthy = AtomicBool::new(true);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = UnhealthyIfPanicking(&healthy);
            })
            .join()
            .expect("ends normally");
        });
        assert!(
            healthy.load(Ordering::Acquire),
            "a normal exit is not a failure"
        );
        std::thread::scope(|s| {
            let joined = s
                .spawn(|| {
                    let _guard = UnhealthyIfPanicking(&healthy);
                    panic!("as sled's asserts can");
                })
                .join();
            assert!(joined.is_err());
        });
        assert!(!healthy.load(Ordering::Acquire));
    }

    /// The cache's form of a session gives back the record and the position its deadline entry
    /// is filed under, and a damaged form is an error, not a panic or a wrong position.
    #[test]
    fn the_cached_form_keeps_the_record_and_the_filed_position() {
        let at = Timestamp::from_millis(1_764_000_000_123);
        for (record, filed) in [
            (&b"a record"[..], Some(at)),
            (&b"a record"[..], None),
            (&b""[..], Some(at)),
            (&b""[..], None),
        ] {
            let form = cached(record, filed);
            let (r, f) = split_cached(&form).expect("a form made by `cached`");
            assert_eq!((r, f), (record, filed));
        }
        for damaged in [&[][..], &[2][..], &[1][..], &[0, 0, 0, 1][..]] {
            assert!(split_cached(damaged).is_err(), "{damaged:?}");
        }
    }

    /// A full disk can first show under a read (sled merges and splits nodes while it walks the
    /// tree): the faults test once saw writes fail so while health said SERVING. The writer turns
    /// unhealthy on `StorageFailed` (see `Tx::run`); other storage errors (a corrupt record) do
    /// not stop all writes.
    #[test]
    fn sled_io_errors_are_store_failures_and_others_are_not() {
        let full = sled::Error::Io(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(matches!(Error::from(full), Error::StorageFailed(_)));
        let unsupported = sled::Error::Unsupported("x".into());
        assert!(matches!(Error::from(unsupported), Error::Storage(_)));
    }
}
