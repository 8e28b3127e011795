//! The etcd backend: several replicas of the service share one etcd cluster.
//!
//! # Reads: a copy per replica
//! Each replica keeps a copy of everything under its prefix ([`mirror`]), loaded at start and
//! kept current by one watch. Every read is answered from it, in memory; no read goes to etcd.
//!
//! # Writes: one transaction each, optimistic
//! A write runs its planner (`model::plan`, the same rules as sled) against the copy, noting the
//! revision of every key the planner read. It then commits one etcd transaction that compares
//! each of those revisions and puts what the plan changed: records, per-user records, events and
//! the log head. If anything it read changed meanwhile (another replica wrote it), the compare
//! fails, nothing is written, and the write runs again on a copy that has caught up (bounded).
//! Keys the planner never read cannot be lost either: a user's set of active sessions has a guard
//! key that every change of the set rewrites and every reader of the set compares, as "not
//! written after the copy's revision", so the copy does not keep guards. The change that empties
//! a set deletes its guard, which such a compare cannot see; so that change itself commits only
//! if the guard was not written after its copy. A plan that passes a compare on a deleted guard
//! then meets an empty set, and what it read of that set's former sessions is compared too.
//!
//! A reply is sent once etcd committed (a quorum has it on disk) **and** this replica's copy has
//! applied the commit, so a caller reads its own writes on the replica it wrote through.
//!
//! # One event sequence for every replica
//! The log's head is a counter key: each write with events compares it and advances it in the same
//! transaction, so sequences are dense and gapless, shared by every replica, and an event is
//! committed with its change or not at all. The cost: every write with events conflicts with any
//! concurrent one on another replica, which then retries. etcd's own revision would avoid that
//! but is not dense and cannot be known before the commit; dense sequences keep the cursor
//! contract every client already relies on (a gap means a lost event).
//!
//! # Size of a transaction
//! etcd refuses transactions of more than `--max-txn-ops` (128) operations. Work on many sessions
//! (bulk revoke, sweep, enforcement) is planned and committed in chunks of [`CHUNK`] sessions:
//! each chunk is atomic, the whole is not. A revoke of a user's sessions covers the sessions that
//! existed when it started.

mod client;
pub mod local;
mod mirror;
mod scan;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ops::Bound,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::watch;

pub use client::EtcdOptions;
use client::{
    delete, delete_range, not_written_after, prefix_end, put, unchanged, Compare, EtcdClient,
    RangeRequest, RequestOp, TxnRequest,
};
use mirror::{Mirror, Pending, Recording, State};

use super::{
    keys, records, CreateOutcome, CreateRules, Defence, Defended, ListPage, ListScope, LogBounds,
    PolicyOf, RevokeOutcome, RevokeTarget, RotateOutcome, SessionStore,
};
use crate::{
    clock::Timestamp,
    error::{Error, Result},
    events::EventBus,
    model::{
        audit::AuditEntry,
        event::Event,
        plan::{Plan, Planner},
        policy::Policy,
        session::{Location, RevokeReason, Session},
        travel::{LastSeen, TravelRules},
    },
    token::{SessionId, TokenHash},
};

/// Sessions planned and committed in one transaction by work on many of them: each ended
/// session costs a record, an event and perhaps a guard, within etcd's 128 operations.
pub const CHUNK: usize = 32;
/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Tries of one write whose reads other replicas keep changing.
const ATTEMPTS: usize = 32;
/// Longest wait for this replica's copy to apply a commit before replying anyway.
const CATCH_UP: Duration = Duration::from_secs(5);
/// How long a starting replica waits for etcd to answer.
const START_WAIT: Duration = Duration::from_secs(60);
/// Pages (of up to 10,000 keys) that a load reads ahead of applying.
const READ_AHEAD: usize = 2;
/// Fence rounds in flight at once.
const FENCE_ROUNDS: usize = 4;
/// Longest wait of a validate for its read fence.
const FENCE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often queued touches are written.
const TOUCH_FLUSH: Duration = Duration::from_millis(500);

/// A session store in an etcd cluster, under a prefix.
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: EtcdClient,
    mirror: Mirror,
    prefix: Vec<u8>,
    /// One planned write at a time per replica: they would conflict on the log head anyway.
    writer: tokio::sync::Mutex<()>,
    /// Planned writes waiting for the writer: whoever holds it commits a group of them at once.
    queue: Mutex<std::collections::VecDeque<Queued>>,
    healthy: AtomicBool,
    db_size: AtomicU64,
    secret: [u8; 32],
    log_epoch: u64,
    tombstone_retention: Duration,
    /// Uses of sessions not written yet; reads apply them (see `SledStore`'s queued touches).
    touches: Mutex<HashMap<SessionId, Timestamp>>,
    /// Sessions an `end_soon` is ending now, so a burst of validates ends each once.
    ending: Mutex<HashSet<SessionId>>,
    /// What was done while etcd was full but not written yet, oldest first: `log_unlogged`
    /// writes it when etcd takes writes again.
    unlogged: Mutex<std::collections::VecDeque<Unlogged>>,
    /// Read fences: tickets asked for, and the newest ticket whose fence holds (see `fence`).
    fence_wanted: AtomicU64,
    fence_wake: tokio::sync::Notify,
    fence_served: watch::Sender<u64>,
    /// `EtcdOptions::no_read_fence`.
    no_read_fence: bool,
    /// This replica's name in the leader key.
    replica_id: String,
    /// The lease this replica campaigns with, and until when it is surely alive.
    lease: Mutex<Option<(i64, std::time::Instant)>>,
    /// Test seam: while true, the watch applies nothing (a replica whose copy lags).
    held: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| Error::Storage(format!("no randomness from the OS: {e}")))?;
    Ok(b)
}

fn random_nonzero_u64() -> Result<u64> {
    Ok(u64::from_be_bytes(random_bytes()?).max(1))
}

impl EtcdStore {
    /// Connects to the cluster, creates the deployment's records under `prefix` if it is new
    /// (once, whichever replica comes first), loads the copy and starts following it.
    pub async fn open(
        options: EtcdOptions,
        prefix: &str,
        event_buffer: usize,
        tombstone_retention: Duration,
    ) -> Result<Self> {
        if prefix.is_empty() {
            return Err(Error::invalid("etcd_prefix", "must not be empty"));
        }
        let client = EtcdClient::new(&options)?;
        let no_read_fence = options.no_read_fence;
        let prefix = prefix.as_bytes().to_vec();
        // etcd may come up after the replicas (a fresh cluster, a restart of everything): wait
        // for it a while rather than exit and be restarted in a loop.
        let deadline = std::time::Instant::now() + START_WAIT;
        let state = loop {
            let loaded = async {
                create_if_absent(&client, &prefix).await?;
                load(&client, &prefix).await
            }
            .await;
            match loaded {
                Ok(loaded) => break loaded,
                Err(Error::Storage(e)) if std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "etcd not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let mirror = Mirror::load(prefix.clone(), state, event_buffer)?;
        let (secret, log_epoch) = {
            let state = mirror.read();
            match state.other.get(keys::META_FORMAT) {
                Some(v) if v.value == keys::ETCD_FORMAT_VALUE => {}
                other => {
                    return Err(Error::DataDir(format!(
                        "etcd prefix {:?} holds an incompatible store format {:?}",
                        String::from_utf8_lossy(&prefix),
                        other.map(|v| String::from_utf8_lossy(&v.value).into_owned())
                    )))
                }
            }
            let secret: [u8; 32] = state
                .other
                .get(keys::META_SECRET)
                .and_then(|v| v.value.as_slice().try_into().ok())
                .ok_or_else(|| Error::Storage("corrupt installation secret in etcd".into()))?;
            (secret, state.u64_at(keys::META_LOG_EPOCH)?)
        };
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            client,
            mirror,
            prefix,
            writer: tokio::sync::Mutex::new(()),
            queue: Mutex::new(std::collections::VecDeque::new()),
            healthy: AtomicBool::new(true),
            db_size: AtomicU64::new(0),
            secret,
            log_epoch,
            tombstone_retention,
            touches: Mutex::new(HashMap::new()),
            ending: Mutex::new(HashSet::new()),
            unlogged: Mutex::new(std::collections::VecDeque::new()),
            fence_wanted: AtomicU64::new(0),
            fence_wake: tokio::sync::Notify::new(),
            fence_served: watch::channel(0).0,
            held: watch::channel(false).0,
            no_read_fence,
            replica_id: hex::encode(random_bytes::<8>()?),
            lease: Mutex::new(None),
            stop,
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            tokio::spawn(follow(inner.clone())),
            tokio::spawn(watch_health(inner.clone())),
            tokio::spawn(flush_touches(inner.clone())),
            tokio::spawn(log_unlogged(inner.clone())),
            tokio::spawn(serve_fences(inner.clone())),
            tokio::spawn(campaign(inner.clone())),
        ];
        *lock(&inner.tasks) = tasks;
        Ok(Self { inner })
    }

    /// Holds (`true`) or releases this replica's watch: a held copy applies nothing, as if the
    /// watch lagged. For tests of the read fence; nothing else calls it.
    #[doc(hidden)]
    pub fn hold_watch(&self, held: bool) {
        self.inner.held.send_replace(held);
    }

    /// The revision this replica's copy has applied.
    pub fn applied_revision(&self) -> i64 {
        self.inner.mirror.revision()
    }

    /// Writes restored records (a backup's, see `store::snapshot`) under `prefix`, which must hold
    /// nothing yet: a deployment moves from sled to etcd (or between clusters) this way. The log
    /// continues from the backup's head in a new epoch.
    pub async fn restore_entries(
        options: EtcdOptions,
        prefix: &str,
        entries: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<u64> {
        let client = EtcdClient::new(&options)?;
        let prefix = prefix.as_bytes().to_vec();
        let existing = client
            .range(RangeRequest {
                key: prefix.clone(),
                range_end: prefix_end(&prefix),
                limit: 1,
                keys_only: true,
                ..Default::default()
            })
            .await?;
        if !existing.kvs.is_empty() {
            return Err(Error::DataDir(format!(
                "etcd prefix {:?} already holds a store",
                String::from_utf8_lossy(&prefix)
            )));
        }
        let key = |k: &[u8]| [prefix.as_slice(), k].concat();
        let mut head = 0u64;
        let mut ops = Vec::new();
        let mut written = 0u64;
        for (k, v) in entries {
            if !super::snapshot::is_record(k) {
                continue;
            }
            match k.first() {
                Some(&keys::EVENT) => head = head.max(keys::parse_event(k).unwrap_or(0)),
                _ if k.as_slice() == keys::META_HEAD => {
                    head = head.max(v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0))
                }
                _ => {}
            }
            if k.as_slice() != keys::META_HEAD {
                ops.push(put(key(k), v.clone()));
                written += 1;
            }
            if ops.len() == MAX_TXN_OPS {
                commit_plain(&client, std::mem::take(&mut ops)).await?;
            }
        }
        // The format last: a restore cut short leaves no store a replica would open.
        ops.push(put(key(keys::META_HEAD), head.to_be_bytes().to_vec()));
        ops.push(put(
            key(keys::META_LOG_EPOCH),
            random_nonzero_u64()?.to_be_bytes().to_vec(),
        ));
        commit_plain(&client, std::mem::take(&mut ops)).await?;
        commit_plain(
            &client,
            vec![put(
                key(keys::META_FORMAT),
                keys::ETCD_FORMAT_VALUE.to_vec(),
            )],
        )
        .await?;
        Ok(written)
    }
}

/// The size of etcd's backend on the member answering, in bytes (for sizing figures).
pub async fn db_size(options: &EtcdOptions) -> Result<u64> {
    EtcdClient::new(options)?.db_size().await
}

/// Recovers a cluster from a NOSPACE alarm the way an operator does with `etcdctl` (compact,
/// defragment every member, disarm); see `EtcdClient::free_space`. For tests and trying it out.
pub async fn free_space(options: &EtcdOptions) -> Result<()> {
    EtcdClient::new(options)?.free_space().await
}

async fn commit_plain(client: &EtcdClient, ops: Vec<RequestOp>) -> Result<()> {
    client
        .txn(TxnRequest {
            success: ops,
            ..Default::default()
        })
        .await
        .map(drop)
}

/// The records a new deployment starts with, written by the first replica only.
async fn create_if_absent(client: &EtcdClient, prefix: &[u8]) -> Result<()> {
    let key = |k: &[u8]| [prefix, k].concat();
    let (_, existing) = {
        let r = client
            .range(RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                count_only: true,
                ..Default::default()
            })
            .await?;
        ((), r.count)
    };
    if existing > 0 {
        return Ok(()); // a store, or a restore in progress: `open` checks the format
    }
    let store_id = hex::encode(random_bytes::<16>()?);
    client
        .txn(TxnRequest {
            compare: vec![unchanged(key(keys::META_SECRET), 0)],
            success: vec![
                put(key(keys::META_STORE_ID), store_id.into_bytes()),
                put(key(keys::META_SECRET), random_bytes::<32>()?.to_vec()),
                put(
                    key(keys::META_LOG_EPOCH),
                    random_nonzero_u64()?.to_be_bytes().to_vec(),
                ),
                put(key(keys::META_FORMAT), keys::ETCD_FORMAT_VALUE.to_vec()),
            ],
            failure: vec![],
        })
        .await
        .map(drop)
}

/// A copy of everything under `prefix`, read page by page at one revision. Reading and applying
/// overlap: etcd serves the next pages while this one is decoded and indexed, so a start takes
/// about the longer of the two rather than their sum.
async fn load(client: &EtcdClient, prefix: &[u8]) -> Result<State> {
    let (pages, mut received) = tokio::sync::mpsc::channel(READ_AHEAD);
    let read = scan::scan(client, prefix.to_vec(), prefix_end(prefix), 0, pages);
    let apply = async move {
        let mut state = State::default();
        while let Some(kvs) = received.recv().await {
            state.load_page(prefix, &kvs)?;
        }
        Ok(state)
    };
    let (revision, mut state) = tokio::try_join!(read, apply)?;
    state.revision = revision;
    Ok(state)
}

// === background tasks ===

/// Keeps the copy current: one watch on the prefix, resumed from the last applied revision on
/// another endpoint when it breaks, reloaded when etcd compacted past it.
async fn follow(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let end = prefix_end(&inner.prefix);
    let mut attempt = 0usize;
    loop {
        if *stop.borrow() {
            return;
        }
        let from = inner.mirror.revision() + 1;
        let opened = tokio::select! {
            s = inner.client.watch(inner.prefix.clone(), end.clone(), from, attempt) => s,
            _ = stop.changed() => return,
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, "etcd watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = stop.changed() => return,
            };
            let reply = match message {
                Ok(Some(reply)) => reply,
                Ok(None) | Err(_) => {
                    attempt += 1;
                    tracing::warn!("etcd watch ended; resuming on the next endpoint");
                    break;
                }
            };
            let mut held = inner.held.subscribe();
            tokio::select! {
                _ = held.wait_for(|h| !*h) => {}
                _ = stop.changed() => return,
            }
            if reply.compact_revision > 0 {
                tracing::warn!(
                    compacted = reply.compact_revision,
                    "etcd compacted past this replica's copy; reloading it"
                );
                match load(&inner.client, &inner.prefix).await {
                    Ok(state) => {
                        if let Err(e) = inner.mirror.replace(state) {
                            tracing::error!(error = %e, "reloading the copy failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "reloading the copy failed"),
                }
                break;
            }
            if reply.canceled {
                attempt += 1;
                break;
            }
            if reply.created && reply.events.is_empty() {
                continue;
            }
            // Events: up to their revision. A progress notice: everything up to its header's.
            let revision = if reply.events.is_empty() {
                reply.header.as_ref().map_or(0, |h| h.revision)
            } else {
                0
            };
            if let Err(e) = inner.mirror.apply(&reply.events, revision) {
                tracing::error!(error = %e, "applying an etcd change failed");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Follows the cluster's health: unhealthy while a linearizable read fails (no quorum, nobody
/// reachable), healthy again as soon as one succeeds.
async fn watch_health(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let ok = inner.client.probe(inner.prefix.clone()).await;
        let was = inner.healthy.swap(ok.is_ok(), Ordering::AcqRel);
        match (&ok, was) {
            (Err(e), true) => tracing::error!(error = %e, "etcd unreachable or without quorum"),
            (Ok(_), false) => tracing::info!("etcd reachable again"),
            _ => {}
        }
        if matches!(ok, Ok(true)) && ticks % 20 == 0 {
            tracing::warn!(
                "etcd raised a NOSPACE alarm: creations are refused; revocations still work"
            );
        }
        if ticks % 10 == 0 {
            if let Ok(size) = inner.client.db_size().await {
                inner.db_size.store(size, Ordering::Relaxed);
            }
        }
        ticks += 1;
    }
}

/// Seconds a leader's lease lasts without renewal: how soon another replica takes over the
/// background work of one that died.
const LEASE_TTL: i64 = 5;

/// Campaigns for the background work (sweeper, enforcement, retention): the replica whose lease
/// holds the leader key runs it. Correctness never depends on it (every write compares what it
/// read, so two sweepers still end each session once); it saves the others the work.
async fn campaign(inner: Arc<Inner>) {
    use client::pb::etcdserverpb::{request_op::Request as Op, PutRequest};
    let mut stop = inner.stop.subscribe();
    let key = inner.key(keys::META_LEADER);
    loop {
        let held = *lock(&inner.lease);
        let alive = match held {
            Some((id, _)) => match inner.client.lease_keep_alive(id).await {
                Ok(ttl) if ttl > 0 => Some((id, ttl)),
                _ => None,
            },
            None => None,
        };
        let lease = match alive {
            Some(lease) => Some(lease),
            None => inner
                .client
                .lease_grant(LEASE_TTL)
                .await
                .ok()
                .map(|id| (id, LEASE_TTL)),
        };
        match lease {
            Some((id, ttl)) => {
                let until = std::time::Instant::now() + Duration::from_secs(ttl.max(1) as u64 - 1);
                *lock(&inner.lease) = Some((id, until));
                let claim = TxnRequest {
                    compare: vec![unchanged(key.clone(), 0)],
                    success: vec![RequestOp {
                        request: Some(Op::RequestPut(PutRequest {
                            key: key.clone(),
                            value: inner.replica_id.clone().into_bytes(),
                            lease: id,
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                };
                if let Ok(reply) = inner.client.txn(claim).await {
                    if reply.succeeded {
                        tracing::info!(replica = %inner.replica_id, "this replica now runs the background work");
                    }
                }
            }
            None => *lock(&inner.lease) = None,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => {
                // Hand over at once rather than after the lease runs out.
                let held = *lock(&inner.lease);
                if let Some((id, _)) = held {
                    let _ = inner.client.lease_revoke(id).await;
                }
                return;
            }
        }
    }
}

impl Inner {
    fn leads(&self) -> bool {
        let alive = lock(&self.lease).is_some_and(|(_, until)| until > std::time::Instant::now());
        alive
            && self
                .mirror
                .read()
                .other
                .get(keys::META_LEADER)
                .is_some_and(|v| v.value == self.replica_id.as_bytes())
    }
}

/// Read fences, shared: each round reads etcd's current revision (a linearizable read, one Raft
/// round trip) and waits until the copy has applied it; that serves every ticket taken before the
/// round began, however many validates wait on it. A validate that arrives while a round is in
/// flight starts the next round at once (up to `FENCE_ROUNDS` at a time) rather than waiting for
/// it to end: so a fence costs one round trip, not up to two.
async fn serve_fences(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let rounds = Arc::new(tokio::sync::Semaphore::new(FENCE_ROUNDS));
    // The newest ticket a round in flight (or done) covers.
    let started = Arc::new(AtomicU64::new(0));
    loop {
        tokio::select! {
            _ = inner.fence_wake.notified() => {}
            _ = stop.changed() => return,
        }
        let upto = inner.fence_wanted.load(Ordering::SeqCst);
        if upto
            <= started
                .load(Ordering::SeqCst)
                .max(*inner.fence_served.borrow())
        {
            continue; // a round that began after these tickets is on its way
        }
        let Ok(permit) = rounds.clone().acquire_owned().await else {
            return;
        };
        // Tickets up to here are served by this round: it begins after they were taken.
        let upto = inner.fence_wanted.load(Ordering::SeqCst);
        started.fetch_max(upto, Ordering::SeqCst);
        let (inner, started) = (inner.clone(), started.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let read = inner
                .client
                .range(RangeRequest {
                    key: inner.key(keys::META_HEAD),
                    count_only: true,
                    ..Default::default()
                })
                .await;
            let revision = match read {
                Ok(r) => r.header.map_or(0, |h| h.revision),
                Err(e) => {
                    // Let the next wake start a round for these tickets again.
                    tracing::debug!(error = %e, "read fence failed; retrying");
                    started.store(*inner.fence_served.borrow(), Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    inner.fence_wake.notify_one();
                    return;
                }
            };
            if inner.mirror.caught_up(revision, CATCH_UP).await {
                inner.fence_served.send_if_modified(|s| {
                    let raised = upto > *s;
                    *s = (*s).max(upto);
                    raised
                });
            } else {
                started.store(*inner.fence_served.borrow(), Ordering::SeqCst);
                inner.fence_wake.notify_one();
            }
        });
    }
}

/// Writes queued touches every `TOUCH_FLUSH`, many per transaction, never one per validate.
async fn flush_touches(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(TOUCH_FLUSH) => false,
            _ = stop.changed() => true,
        };
        let queued: Vec<(SessionId, Timestamp)> = lock(&inner.touches)
            .iter()
            .map(|(id, at)| (*id, *at))
            .collect();
        for chunk in queued.chunks(CHUNK * 2) {
            let written = inner.plan_touches(chunk.to_vec()).await;
            if let Err(e) = written {
                tracing::debug!(error = %e, "touches not written; last_seen_at stays coarser");
            }
            let mut touches = lock(&inner.touches);
            for (id, at) in chunk {
                if touches.get(id).is_some_and(|queued| queued <= at) {
                    touches.remove(id);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Writes the tombstones and events of revocations made by deleting while etcd was full, once
/// it takes writes again (tried every second). Caches learn of those revocations then; the
/// revocations themselves held from the start.
async fn log_unlogged(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        loop {
            match inner.log_oldest_unlogged().await {
                Ok(true) => tracing::info!("logged a revocation made while etcd was full"),
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "revocations made while etcd was full: not logged yet");
                    break;
                }
            }
        }
    }
}

// === writes ===

/// The newest audit id ever stored: the newest kept, or the newest pruned.
fn last_audit_id(state: &State) -> Result<u64> {
    let kept = state
        .other
        .range(vec![keys::AUDIT]..vec![keys::AUDIT + 1])
        .next_back()
        .and_then(|(k, _)| k.get(1..9).and_then(|b| b.try_into().ok()))
        .map_or(0, u64::from_be_bytes);
    Ok(kept.max(state.u64_at(keys::META_AUDIT_HEAD)?))
}

/// The same failure for each member of a group (errors are not `Clone`).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
        Error::StoreFull(m) => Error::StoreFull(m.clone()),
        other => Error::Storage(other.to_string()),
    }
}

/// Most planned writes committed in one transaction.
const GROUP: usize = 16;

/// What a queued write answers: its planner's outcome, whatever its type.
type Planned = Box<dyn std::any::Any + Send>;
type PlanFn = Box<dyn Fn(&mut Planner<'_, Recording<'_>>) -> Result<Planned> + Send>;

/// A write waiting for the writer.
struct Queued {
    work: Work,
    reply: tokio::sync::oneshot::Sender<Result<Planned>>,
}

/// What a queued write does.
enum Work {
    /// Runs a planner; commits its plan.
    Plan(PlanFn),
    /// As `Plan`, for queued touches: planned on the copy without the queued touches, which are
    /// what it writes (applied to what it reads, each would find itself already there, and
    /// write nothing).
    Touches(PlanFn),
    /// Appends to the audit trail; answers the id (a `u64`).
    Audit(AuditEntry),
}

/// What became of one member of a group this round.
enum Fate {
    /// In the transaction; its answer once it commits.
    Included(Result<Planned>),
    /// Answered without a commit (a storage error while planning).
    Alone(Result<Planned>),
    /// It reads or writes what an earlier member writes: the next group takes it.
    Deferred,
}

/// The keys a plan writes (a superset: every changed session's guard), but for events and the
/// head, which group members share by construction.
fn written_keys(plan: &Plan) -> HashSet<Vec<u8>> {
    let mut out = HashSet::new();
    for (old, new) in &plan.sessions {
        if let Some(s) = old.as_ref().or(new.as_ref()) {
            out.insert(keys::session(&s.id).to_vec());
            out.insert(keys::per_user(keys::GUARD, &s.tenant_id, &s.user_id));
        }
    }
    for (tenant, user, _) in &plan.last_seen {
        out.insert(keys::per_user(keys::LAST_SEEN, tenant, user));
    }
    for (tenant, user, _) in &plan.creations {
        out.insert(keys::per_user(keys::CREATIONS, tenant, user));
    }
    for (tenant, user, _) in &plan.logins {
        out.insert(keys::per_user(keys::LOGINS, tenant, user));
    }
    out
}

/// Whether `user` has an active session once `sessions` (each changed session's first and last
/// state) are written over the copy `state`.
fn keeps_a_session(
    state: &State,
    sessions: &BTreeMap<SessionId, (Option<Session>, Option<Session>)>,
    tenant: &str,
    user: &str,
) -> bool {
    let one_left_alone = state
        .user_session_ids(tenant, user)
        .iter()
        .any(|id| !sessions.contains_key(id));
    one_left_alone
        || sessions.values().any(|(_, new)| {
            new.as_ref()
                .is_some_and(|s| s.is_active() && s.tenant_id == tenant && s.user_id == user)
        })
}

/// Done while etcd was full (it takes deletes only), to be written when space returns.
#[derive(Clone)]
enum Unlogged {
    /// A revocation committed as deletes: its plan, whose tombstones and events are not written.
    Revocation(Plan),
    /// An audit entry of such a revocation.
    Audit(AuditEntry),
}

/// A plan as etcd operations.
struct Txn {
    compare: Vec<Compare>,
    ops: Vec<RequestOp>,
}

impl Inner {
    fn key(&self, k: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), k].concat()
    }

    /// Runs a planner on the copy and commits its plan, again on a fresher copy while other
    /// replicas change what it read. The plan is committed also when the planner refused (see
    /// `model::plan`), but not after a storage error.
    ///
    /// Group commit: the write is queued, and whoever holds the writer commits every queued
    /// write that touches nothing an earlier one in the group writes, in one transaction and one
    /// round trip (as sled's writer shares a flush). Their plans are made one after another on
    /// one copy, their events numbered in that order.
    async fn plan<T: Send + 'static>(
        &self,
        write: impl Fn(&mut Planner<'_, Recording<'_>>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let work = Work::Plan(Box::new(move |p| write(p).map(|t| Box::new(t) as Planned)));
        self.submit(work).await
    }

    /// Writes queued touches (see `Work::Touches`).
    async fn plan_touches(&self, touches: Vec<(SessionId, Timestamp)>) -> Result<()> {
        let work = Work::Touches(Box::new(move |p| {
            for (id, at) in &touches {
                p.touch(*id, *at)?;
            }
            Ok(Box::new(()) as Planned)
        }));
        self.submit(work).await
    }

    /// Appends to the audit trail in the next group; its id. On a full etcd the entry waits
    /// for space (0): it audits a revocation, which a full store must not refuse.
    async fn audit(&self, entry: AuditEntry) -> Result<u64> {
        match self.submit(Work::Audit(entry.clone())).await {
            Err(Error::StoreFull(why)) => {
                tracing::warn!(%why, action = %entry.action, "audit entry held until etcd has space");
                lock(&self.unlogged).push_back(Unlogged::Audit(entry));
                Ok(0)
            }
            other => other,
        }
    }

    /// Queues `work` and waits for its answer, committing groups while it is not done.
    async fn submit<T: Send + 'static>(&self, work: Work) -> Result<T> {
        use tokio::sync::oneshot::error::TryRecvError;
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        lock(&self.queue).push_back(Queued { work, reply });
        loop {
            let _turn = self.writer.lock().await;
            match answer.try_recv() {
                Ok(result) => {
                    return result.and_then(|b| {
                        b.downcast::<T>()
                            .map(|t| *t)
                            .map_err(|_| Error::Storage("internal: a reply of another type".into()))
                    })
                }
                Err(TryRecvError::Closed) => {
                    return Err(Error::Storage(
                        "internal: a queued write was dropped".into(),
                    ))
                }
                Err(TryRecvError::Empty) => self.commit_group().await,
            }
        }
    }

    /// Takes queued writes and commits them as one transaction, answering each. The caller
    /// holds the writer.
    async fn commit_group(&self) {
        let mut group: Vec<Queued> = {
            let mut queue = lock(&self.queue);
            let n = queue.len().min(GROUP);
            queue.drain(..n).collect()
        };
        for _ in 0..ATTEMPTS {
            if group.is_empty() {
                return;
            }
            let (fates, txn) = match self.plan_group(&group) {
                Ok(planned) => planned,
                Err(e) => {
                    for q in group {
                        let _ = q.reply.send(Err(copy_error(&e)));
                    }
                    return;
                }
            };
            let included = fates
                .iter()
                .filter(|f| matches!(f, Fate::Included(_)))
                .count();
            if txn.ops.len() > MAX_TXN_OPS && included > 1 {
                // Too big together (evictions, say): the first alone, the rest queued again.
                let mut queue = lock(&self.queue);
                for q in group.drain(1..).rev() {
                    queue.push_front(q);
                }
                continue;
            }
            let committed = if txn.ops.is_empty() {
                Ok(true)
            } else {
                self.commit(txn).await
            };
            let failure = match committed {
                Ok(false) => continue, // another replica changed what was read: plan again
                Ok(true) => None,
                Err(e) => Some(e),
            };
            let mut deferred = Vec::new();
            for (q, fate) in group.into_iter().zip(fates) {
                let answer = match (fate, &failure) {
                    (Fate::Deferred, _) => {
                        deferred.push(q);
                        continue;
                    }
                    (Fate::Included(_), Some(e)) => Err(copy_error(e)),
                    (Fate::Included(result) | Fate::Alone(result), _) => result,
                };
                let _ = q.reply.send(answer);
            }
            let mut queue = lock(&self.queue);
            for q in deferred.into_iter().rev() {
                queue.push_front(q);
            }
            return;
        }
        for q in group {
            let _ = q.reply.send(Err(Error::Storage(format!(
                "gave up after {ATTEMPTS} tries: other replicas kept changing the same records"
            ))));
        }
    }

    /// Plans each member of a group on one copy. A member that reads or writes a key an earlier
    /// member writes waits for the next group, so every plan reads what it would have read
    /// committed alone.
    fn plan_group(&self, group: &[Queued]) -> Result<(Vec<Fate>, Txn)> {
        let state = self.mirror.read();
        let mut head = state.head()?;
        let mut reads: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        let mut written: HashSet<Vec<u8>> = HashSet::new();
        let mut plans = Vec::new();
        let mut fates = Vec::new();
        // Audit entries take the ids after the newest ever stored, in queue order.
        let mut audit_next = None;
        let mut audit_puts = Vec::new();
        for q in group {
            let (write, with_touches) = match &q.work {
                Work::Plan(write) => (write, true),
                Work::Touches(write) => (write, false),
                Work::Audit(entry) => {
                    let id = match audit_next {
                        Some(id) => id,
                        None => last_audit_id(&state)? + 1,
                    };
                    let mut entry = entry.clone();
                    entry.id = id;
                    match serde_json::to_vec(&entry) {
                        Ok(value) => {
                            audit_puts.push((keys::audit(id).to_vec(), value));
                            audit_next = Some(id + 1);
                            fates.push(Fate::Included(Ok(Box::new(id) as Planned)));
                        }
                        Err(e) => fates.push(Fate::Alone(Err(Error::Storage(format!(
                            "encoding an audit record: {e}"
                        ))))),
                    }
                    continue;
                }
            };
            let without_touches = WithoutTouches(self);
            let pending: &dyn Pending = if with_touches { self } else { &without_touches };
            let view = Recording::new(&state, pending);
            let mut planner = Planner::new(&view, Plan::new(head, self.tombstone_retention));
            let result = write(&mut planner);
            let plan = planner.plan;
            if result.as_ref().is_err_and(Error::is_storage) {
                fates.push(Fate::Alone(result));
                continue;
            }
            let its_reads = view.reads.into_inner();
            let its_writes = written_keys(&plan);
            let clash = its_reads.keys().any(|k| written.contains(k))
                || its_writes
                    .iter()
                    .any(|k| written.contains(k) || reads.contains_key(k));
            if clash {
                fates.push(Fate::Deferred);
                continue;
            }
            head = plan.head;
            reads.extend(its_reads);
            written.extend(its_writes);
            plans.push(plan);
            fates.push(Fate::Included(result));
        }
        let mut txn = self.txn_for(&state, &reads, plans)?;
        if let Some(next) = audit_next {
            // The counter makes ids unique across replicas: two groups with audits conflict on it.
            txn.compare.push(unchanged(
                self.key(keys::META_AUDIT_HEAD),
                state.revision_of(keys::META_AUDIT_HEAD),
            ));
            for (k, v) in audit_puts {
                txn.ops.push(put(self.key(&k), v));
            }
            txn.ops.push(put(
                self.key(keys::META_AUDIT_HEAD),
                (next - 1).to_be_bytes().to_vec(),
            ));
        }
        Ok((fates, txn))
    }

    /// Commits; true if the compares held. Either way, returns once the copy has applied the
    /// revision etcd answered at, so a retry plans on what made it fail.
    async fn commit(&self, txn: Txn) -> Result<bool> {
        if txn.ops.len() > MAX_TXN_OPS || txn.compare.len() > MAX_TXN_OPS {
            return Err(Error::Storage(format!(
                "internal: a write of {} operations and {} compares exceeds etcd's {MAX_TXN_OPS}",
                txn.ops.len(),
                txn.compare.len()
            )));
        }
        let reply = self
            .client
            .txn(TxnRequest {
                compare: txn.compare,
                success: txn.ops,
                failure: vec![],
            })
            .await?;
        let revision = reply.header.as_ref().map_or(0, |h| h.revision);
        if !self.mirror.caught_up(revision, CATCH_UP).await {
            tracing::warn!(
                revision,
                "this replica's copy is behind etcd; replying anyway"
            );
        }
        Ok(reply.succeeded)
    }

    /// What a plan's commit compares: every key it read is as the copy had it.
    fn unchanged_reads(&self, state: &State, reads: &BTreeMap<Vec<u8>, i64>) -> Vec<Compare> {
        reads
            .iter()
            .map(|(k, rev)| match k.first() {
                Some(&keys::GUARD) => self.guard_unchanged(state, k),
                _ => unchanged(self.key(k), *rev),
            })
            .collect()
    }

    /// A user's guard as the copy `state` would have it, had it kept guards: "not written after
    /// the copy's revision" (see the module docs for why a delete it cannot see is safe).
    fn guard_unchanged(&self, state: &State, guard: &[u8]) -> Compare {
        not_written_after(self.key(guard), state.revision)
    }

    /// The operations of a plan: each session's final record, guards of users whose set of
    /// active sessions changed, per-user records, events and the head; compares on all reads.
    /// Several plans (a group of creations for distinct users) make one transaction: their reads
    /// are disjoint but for nothing, their events numbered one after another.
    fn txn_for(
        &self,
        state: &State,
        reads: &BTreeMap<Vec<u8>, i64>,
        plans: Vec<Plan>,
    ) -> Result<Txn> {
        let mut compare = self.unchanged_reads(state, reads);
        // etcd refuses a key twice in one transaction: keep each session's first and last state.
        let mut sessions: BTreeMap<SessionId, (Option<Session>, Option<Session>)> = BTreeMap::new();
        let mut last_seen = Vec::new();
        let mut creations = Vec::new();
        let mut logins = Vec::new();
        let mut events = Vec::new();
        let mut head = None;
        for plan in plans {
            for (old, new) in plan.sessions {
                let Some(id) = old.as_ref().or(new.as_ref()).map(|s| s.id) else {
                    continue;
                };
                sessions
                    .entry(id)
                    .and_modify(|e| e.1 = new.clone())
                    .or_insert((old, new));
            }
            last_seen.extend(plan.last_seen);
            creations.extend(plan.creations);
            logins.extend(plan.logins);
            if !plan.events.is_empty() {
                head = Some(plan.head);
            }
            events.extend(plan.events);
        }
        let mut puts: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut changed_sets = BTreeSet::new();
        for (id, (old, new)) in &sessions {
            let was = old.as_ref().filter(|s| s.is_active());
            let is = new.as_ref().filter(|s| s.is_active());
            if was.is_some() != is.is_some() {
                let s = was.or(is).expect("one of them is active");
                changed_sets.insert((s.tenant_id.as_str(), s.user_id.as_str()));
            }
            match new {
                Some(s) => {
                    puts.insert(keys::session(id).to_vec(), Some(records::encode_session(s)))
                }
                None => puts.insert(keys::session(id).to_vec(), None),
            };
        }
        for (tenant, user) in changed_sets {
            let guard = keys::per_user(keys::GUARD, tenant, user);
            if keeps_a_session(state, &sessions, tenant, user) {
                puts.insert(guard, Some(Vec::new()));
            } else {
                // An emptied set's guard goes, so etcd keeps one for each user with sessions
                // rather than each user ever seen. A delete passes every later "not written
                // after" compare, so it must not hide a change: it commits only if nobody
                // changed the set since this copy, and the set it leaves is empty.
                if !reads.contains_key(&guard) {
                    compare.push(self.guard_unchanged(state, &guard));
                }
                puts.insert(guard, None);
            }
        }
        for (tenant, user, seen) in &last_seen {
            puts.insert(
                keys::per_user(keys::LAST_SEEN, tenant, user),
                Some(records::encode_last_seen(seen)),
            );
        }
        for (tenant, user, times) in &creations {
            puts.insert(
                keys::per_user(keys::CREATIONS, tenant, user),
                Some(records::encode_creations(times)),
            );
        }
        for (tenant, user, recent) in &logins {
            puts.insert(
                keys::per_user(keys::LOGINS, tenant, user),
                Some(records::encode_logins(recent)),
            );
        }
        if let Some(head) = head {
            compare.push(unchanged(
                self.key(keys::META_HEAD),
                state.revision_of(keys::META_HEAD),
            ));
            puts.insert(keys::META_HEAD.to_vec(), Some(head.to_be_bytes().to_vec()));
        }
        for event in &events {
            puts.insert(
                keys::event(event.sequence).to_vec(),
                Some(records::encode_event(event)),
            );
        }
        let ops = puts
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => put(self.key(&k), v),
                None => delete(self.key(&k)),
            })
            .collect();
        // Compare each key once.
        compare.dedup_by(|a, b| a.key == b.key);
        Ok(Txn { compare, ops })
    }

    /// Commits writes that are not plans: `build` reads the copy and returns what to compare and
    /// do (nothing to do: done), again on a fresher copy after a conflict.
    async fn write_with<T>(
        &self,
        build: impl Fn(&State) -> Result<(T, Vec<Compare>, Vec<RequestOp>)>,
    ) -> Result<T> {
        let _turn = self.writer.lock().await;
        for _ in 0..ATTEMPTS {
            let (value, compare, ops) = build(&self.mirror.read())?;
            if ops.is_empty() || self.commit(Txn { compare, ops }).await? {
                return Ok(value);
            }
        }
        Err(Error::Storage(format!(
            "gave up after {ATTEMPTS} tries: other replicas kept changing the same records"
        )))
    }

    async fn enforce(
        &self,
        ids: Vec<SessionId>,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> Result<usize> {
        let mut changed = 0;
        for chunk in ids.chunks(CHUNK) {
            changed += self
                .plan({
                    let (chunk, policy) = (chunk.to_vec(), policy.clone());
                    move |p| p.enforce(chunk.clone(), &policy, now)
                })
                .await?;
        }
        Ok(changed)
    }

    async fn revoke(
        &self,
        target: RevokeTarget,
        reason: RevokeReason,
        now: Timestamp,
    ) -> Result<RevokeOutcome> {
        // Small targets: one transaction, atomic.
        let chunks: Vec<RevokeTarget> = match &target {
            RevokeTarget::Sessions { ids, tenant } if ids.len() > CHUNK => {
                // All or nothing for the ids' existence, checked first; then chunk by chunk.
                {
                    let state = self.mirror.read();
                    for id in ids {
                        let found = state
                            .session(id)?
                            .is_some_and(|s| tenant.as_ref().is_none_or(|t| *t == s.tenant_id));
                        if !found {
                            return Err(Error::SessionNotFound(*id));
                        }
                    }
                }
                ids.chunks(CHUNK)
                    .map(|c| RevokeTarget::AnyOf(c.to_vec()))
                    .collect()
            }
            RevokeTarget::AnyOf(ids) if ids.len() > CHUNK => ids
                .chunks(CHUNK)
                .map(|c| RevokeTarget::AnyOf(c.to_vec()))
                .collect(),
            RevokeTarget::User {
                tenant_id,
                user_id,
                except,
            } => {
                let ids: Vec<SessionId> = self
                    .mirror
                    .read()
                    .user_session_ids(tenant_id, user_id)
                    .into_iter()
                    .filter(|id| Some(*id) != *except)
                    .collect();
                if ids.len() > CHUNK {
                    ids.chunks(CHUNK)
                        .map(|c| RevokeTarget::AnyOf(c.to_vec()))
                        .collect()
                } else {
                    vec![target.clone()]
                }
            }
            _ => vec![target.clone()],
        };
        let mut total = RevokeOutcome {
            revoked: Vec::new(),
            sessions: Vec::new(),
            sequence: 0,
        };
        for chunk in chunks {
            let planned = self
                .plan({
                    let chunk = chunk.clone();
                    move |p| p.revoke(chunk.clone(), reason, now)
                })
                .await;
            let done = match planned {
                // Never let a full store stop a logout: etcd still takes deletes.
                Err(Error::StoreFull(_)) => self.revoke_by_deleting(chunk, reason, now).await?,
                other => other?,
            };
            total.revoked.extend(done.revoked);
            total.sessions.extend(done.sessions);
            total.sequence = done.sequence;
        }
        if total.sequence == 0 {
            total.sequence = self.mirror.bus().durable_head();
        }
        Ok(total)
    }
}

impl Inner {
    /// A revoke while etcd is full (NOSPACE alarm: it takes reads and deletes only). The same
    /// planner decides what ends; the records of those sessions are deleted, compared on what
    /// the plan read, so every replica refuses them at once. Their tombstones and events are
    /// written when space returns (`log_unlogged`); until then this replica answers for the
    /// tombstones, and the reply's sequence is the log's head.
    async fn revoke_by_deleting(
        &self,
        target: RevokeTarget,
        reason: RevokeReason,
        now: Timestamp,
    ) -> Result<RevokeOutcome> {
        let _turn = self.writer.lock().await;
        for _ in 0..ATTEMPTS {
            let (outcome, plan, txn) = {
                let state = self.mirror.read();
                let view = Recording::new(&state, self);
                let mut planner =
                    Planner::new(&view, Plan::new(state.head()?, self.tombstone_retention));
                let outcome = planner.revoke(target.clone(), reason, now)?;
                let plan = planner.plan;
                let compare = self.unchanged_reads(&state, &view.reads.into_inner());
                let ids: BTreeSet<SessionId> = plan
                    .sessions
                    .iter()
                    .filter_map(|(old, new)| old.as_ref().or(new.as_ref()).map(|s| s.id))
                    .collect();
                let ops = ids
                    .iter()
                    .map(|id| delete(self.key(&keys::session(id))))
                    .collect();
                (outcome, plan, Txn { compare, ops })
            };
            let sequence = self.mirror.bus().durable_head();
            if txn.ops.is_empty() {
                return Ok(RevokeOutcome {
                    sequence,
                    ..outcome
                });
            }
            if self.commit(txn).await? {
                tracing::warn!(
                    sessions = outcome.revoked.len(),
                    "etcd is full: revoked by deleting the records; their events follow when \
                     space returns"
                );
                lock(&self.unlogged).push_back(Unlogged::Revocation(plan));
                return Ok(RevokeOutcome {
                    sequence,
                    ..outcome
                });
            }
        }
        Err(Error::Storage(format!(
            "gave up after {ATTEMPTS} tries: other replicas kept changing the same records"
        )))
    }

    /// Writes the oldest of what was done while etcd was full. A revocation: its tombstones and
    /// events, numbered from the head now, for the sessions whose key nobody wrote since
    /// (compared absent). False when there is nothing.
    async fn log_oldest_unlogged(&self) -> Result<bool> {
        let oldest = lock(&self.unlogged).front().cloned();
        let plan = match oldest {
            None => return Ok(false),
            Some(Unlogged::Revocation(plan)) => plan,
            Some(Unlogged::Audit(entry)) => {
                self.submit::<u64>(Work::Audit(entry)).await?;
                lock(&self.unlogged).pop_front();
                return Ok(true);
            }
        };
        self.write_with(|state| {
            let mut plan = plan.clone();
            // A session whose key was written since (an eviction's tombstone, say) has a record
            // and an event already: leave it out.
            let gone: HashSet<SessionId> = plan
                .sessions
                .iter()
                .filter_map(|(old, new)| old.as_ref().or(new.as_ref()).map(|s| s.id))
                .filter(|id| !state.has_session(id))
                .collect();
            plan.sessions.retain(|(old, new)| {
                old.as_ref()
                    .or(new.as_ref())
                    .is_some_and(|s| gone.contains(&s.id))
            });
            plan.events.retain(|e| gone.contains(&e.session_id));
            let plan = plan.renumbered(state.head()?);
            let reads = gone
                .iter()
                .map(|id| (keys::session(id).to_vec(), 0))
                .collect();
            let txn = self.txn_for(state, &reads, vec![plan])?;
            Ok(((), txn.compare, txn.ops))
        })
        .await?;
        lock(&self.unlogged).pop_front();
        Ok(true)
    }
}

/// What a replica knows that its copy does not hold yet, less the queued touches: the view that
/// writing them plans on (see `Work::Touches`).
struct WithoutTouches<'a>(&'a Inner);

impl Pending for WithoutTouches<'_> {
    fn touched(&self, _: &SessionId) -> Option<Timestamp> {
        None
    }

    fn unlogged(&self, id: &SessionId) -> Option<Session> {
        self.0.unlogged(id)
    }
}

impl Pending for Inner {
    fn touched(&self, id: &SessionId) -> Option<Timestamp> {
        lock(&self.touches).get(id).copied()
    }

    fn unlogged(&self, id: &SessionId) -> Option<Session> {
        let unlogged = lock(&self.unlogged);
        unlogged.iter().rev().find_map(|done| {
            let Unlogged::Revocation(plan) = done else {
                return None;
            };
            plan.sessions
                .iter()
                .rev()
                .find(|(old, new)| old.as_ref().or(new.as_ref()).is_some_and(|s| s.id == *id))
                .and_then(|(_, new)| new.clone())
        })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // The background tasks hold the shared state; without this they would outlive the store.
        let _ = self.inner.stop.send(true);
    }
}

// === the trait ===

impl SessionStore for EtcdStore {
    fn get(&self, id: &SessionId) -> Result<Option<Session>> {
        // The queued touch before the record: the flusher drops a touch only once the copy has
        // applied it, so one of the two always has it (see `SledStore`'s read for the race).
        let queued = lock(&self.inner.touches).get(id).copied();
        let stored = self.inner.mirror.read().session(id)?;
        let mut session = stored.or_else(|| self.inner.unlogged(id));
        if let (Some(s), Some(at)) = (session.as_mut().filter(|s| s.is_active()), queued) {
            s.last_seen_at = s.last_seen_at.max(at);
        }
        Ok(session)
    }

    fn list(&self, scope: &ListScope, cursor: Option<&[u8]>, limit: usize) -> Result<ListPage> {
        let (prefix, start) = super::list_start(scope, cursor)?;
        let keys: Vec<Vec<u8>> = {
            let state = self.inner.mirror.read();
            state
                .users
                .range((start, Bound::Unbounded))
                .take_while(|k| k.starts_with(&prefix))
                .take(limit.saturating_add(1))
                .cloned()
                .collect()
        };
        let more = keys.len() > limit;
        let mut sessions = Vec::with_capacity(keys.len().min(limit));
        let mut last_key = None;
        for key in keys.into_iter().take(limit) {
            let id = keys::session_id_of_user_key(&key)
                .ok_or_else(|| Error::Storage("corrupt user index key".into()))?;
            if let Some(s) = self.get(&id)? {
                sessions.push(s);
            }
            last_key = Some(key);
        }
        Ok(ListPage {
            sessions,
            next: if more { last_key } else { None },
        })
    }

    fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<SessionId>> {
        let range = super::due_range(now);
        let state = self.inner.mirror.read();
        state
            .deadlines
            .range(range)
            .take(limit)
            .map(|k| {
                keys::parse_deadline(k)
                    .map(|(_, id)| id)
                    .ok_or_else(|| Error::Storage("corrupt deadline index key".into()))
            })
            .collect()
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let head = self.inner.mirror.bus().durable_head();
        if after >= head {
            return Ok(Vec::new());
        }
        let state = self.inner.mirror.read();
        state.events_in(after + 1..=head).take(limit).collect()
    }

    fn visit_events_since(&self, since: Timestamp, visit: &mut dyn FnMut(&Event)) -> Result<()> {
        let head = self.inner.mirror.bus().durable_head();
        let state = self.inner.mirror.read();
        for event in state.events_in(..=head).rev() {
            let event = event?;
            if event.occurred_at < since {
                break;
            }
            visit(&event);
        }
        Ok(())
    }

    fn log_bounds(&self) -> Result<LogBounds> {
        let head = self.inner.mirror.bus().durable_head();
        let state = self.inner.mirror.read();
        let first = state
            .events
            .keys()
            .next()
            .map_or(head + 1, |f| (*f).min(head + 1));
        Ok(LogBounds { first, head })
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.inner.db_size.load(Ordering::Relaxed))
    }

    fn events(&self) -> Arc<EventBus> {
        self.inner.mirror.bus()
    }

    fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    async fn create(&self, session: Session, rules: CreateRules) -> Result<CreateOutcome> {
        self.inner
            .plan(move |p| p.create(session.clone(), rules.clone()))
            .await
    }

    async fn enforce(
        &self,
        ids: Vec<SessionId>,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> Result<usize> {
        self.inner.enforce(ids, policy, now).await
    }

    async fn observe(
        &self,
        id: SessionId,
        location: Location,
        now: Timestamp,
        rules: TravelRules,
    ) -> Result<Session> {
        self.inner
            .plan(move |p| p.observe(id, location.clone(), now, rules))
            .await
    }

    fn last_seen(&self, tenant_id: &str, user_id: &str) -> Result<Option<LastSeen>> {
        let state = self.inner.mirror.read();
        state
            .other
            .get(&keys::per_user(keys::LAST_SEEN, tenant_id, user_id))
            .map(|v| records::decode_last_seen(&v.value))
            .transpose()
    }

    fn policies(&self) -> Result<Vec<(String, Policy)>> {
        let state = self.inner.mirror.read();
        let mut out = Vec::new();
        for (key, v) in state
            .other
            .range(vec![keys::POLICY]..vec![keys::POLICY + 1])
        {
            let tenant = String::from_utf8(key[1..].to_vec())
                .map_err(|_| Error::Storage("corrupt policy key".into()))?;
            out.push((tenant, records::decode_policy(&v.value)?));
        }
        Ok(out)
    }

    async fn put_policy(&self, tenant_id: String, policy: Option<Policy>) -> Result<bool> {
        let key = keys::policy(&tenant_id);
        let value = policy.as_ref().map(records::encode_policy).transpose()?;
        let mark = random_nonzero_u64()?;
        self.inner
            .write_with(|state| {
                let existed = state.other.contains_key(&key);
                let compare = vec![unchanged(self.inner.key(&key), state.revision_of(&key))];
                let change = match &value {
                    Some(v) => put(self.inner.key(&key), v.clone()),
                    None => delete(self.inner.key(&key)),
                };
                let marked = put(
                    self.inner.key(&keys::per_tenant(keys::ENFORCE, &tenant_id)),
                    mark.to_be_bytes().to_vec(),
                );
                Ok((existed, compare, vec![change, marked]))
            })
            .await
    }

    fn pending_enforcements(&self) -> Result<Vec<String>> {
        let state = self.inner.mirror.read();
        state
            .other
            .range(vec![keys::ENFORCE]..vec![keys::ENFORCE + 1])
            .map(|(k, _)| {
                String::from_utf8(k[1..].to_vec())
                    .map_err(|_| Error::Storage("corrupt enforcement key".into()))
            })
            .collect()
    }

    fn enforcement_pending(&self, tenant_id: &str) -> Result<Option<u64>> {
        let key = keys::per_tenant(keys::ENFORCE, tenant_id);
        let state = self.inner.mirror.read();
        match state.other.get(&key) {
            None => Ok(None),
            Some(_) => state.u64_at(&key).map(Some),
        }
    }

    async fn enforcement_done(&self, tenant_id: String, mark: u64) -> Result<()> {
        let key = keys::per_tenant(keys::ENFORCE, &tenant_id);
        self.inner
            .write_with(|state| {
                let current = state.other.get(&key).map(|v| v.value.clone());
                if current.as_deref() != Some(&mark.to_be_bytes()[..]) {
                    return Ok(((), vec![], vec![]));
                }
                let compare = vec![unchanged(self.inner.key(&key), state.revision_of(&key))];
                Ok(((), compare, vec![delete(self.inner.key(&key))]))
            })
            .await
    }

    fn installation_secret(&self) -> [u8; 32] {
        self.inner.secret
    }

    fn log_epoch(&self) -> u64 {
        self.inner.log_epoch
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<u64> {
        self.inner.audit(entry).await
    }

    async fn snapshot(&self, path: std::path::PathBuf) -> Result<u64> {
        // The copy at one revision, encoded under the read lock; written to disk off it.
        let entries: Vec<(Vec<u8>, Vec<u8>)> = {
            let state = self.inner.mirror.read();
            let mut out = Vec::new();
            for (k, v) in &state.other {
                if super::snapshot::is_record(k) {
                    out.push((k.clone(), v.value.clone()));
                }
            }
            for (id, value) in state.encoded_sessions() {
                out.push((keys::session(id).to_vec(), value.to_vec()));
            }
            for (seq, value) in &state.events {
                out.push((keys::event(*seq).to_vec(), value.to_vec()));
            }
            out.sort();
            out
        };
        crate::store::scan(move || {
            let mut out = super::snapshot::SnapshotWriter::create(&path)?;
            let io = super::snapshot::io("writing", &path);
            for (k, v) in &entries {
                out.entry(k, v).map_err(&io)?;
            }
            out.finish().map_err(&io)
        })
        .await
    }

    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let state = self.inner.mirror.read();
        state
            .other
            .range(keys::audit(after.saturating_add(1)).to_vec()..=keys::audit(u64::MAX).to_vec())
            .take(limit)
            .map(|(_, v)| {
                serde_json::from_slice(&v.value)
                    .map_err(|_| Error::Storage("corrupt audit record".into()))
            })
            .collect()
    }

    async fn rotate(
        &self,
        id: SessionId,
        current: TokenHash,
        replacement: TokenHash,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> Result<RotateOutcome> {
        self.inner
            .plan(move |p| p.rotate(id, current, replacement, &policy, now))
            .await
    }

    async fn defend(
        &self,
        id: SessionId,
        defence: Defence,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> Result<Defended> {
        self.inner
            .plan(move |p| p.defend(id, defence.clone(), &policy, now))
            .await
    }

    async fn revoke(
        &self,
        target: RevokeTarget,
        reason: RevokeReason,
        now: Timestamp,
    ) -> Result<RevokeOutcome> {
        self.inner.revoke(target, reason, now).await
    }

    async fn sweep(
        &self,
        ids: Vec<SessionId>,
        policy_of: PolicyOf,
        now: Timestamp,
    ) -> Result<usize> {
        let mut expired = 0;
        for chunk in ids.chunks(CHUNK) {
            expired += self
                .inner
                .plan({
                    let (chunk, policy_of) = (chunk.to_vec(), policy_of.clone());
                    move |p| p.sweep(chunk.clone(), &policy_of, now)
                })
                .await?;
        }
        Ok(expired)
    }

    async fn prune_events(&self, older_than: Timestamp, keep: u64) -> Result<usize> {
        self.inner
            .write_with(|state| {
                let head = state.head()?;
                let mut doomed: Vec<u64> = Vec::new();
                for e in state.events_in(..).take(10_000) {
                    let e = e?;
                    if head.saturating_sub(e.sequence) >= keep || e.occurred_at < older_than {
                        doomed.push(e.sequence);
                    } else {
                        break;
                    }
                }
                let (Some(first), Some(last)) = (doomed.first(), doomed.last()) else {
                    return Ok((0, vec![], vec![]));
                };
                // One range delete; the head key stays, so the log's head survives an empty log.
                let op = delete_range(
                    self.inner.key(&keys::event(*first)),
                    self.inner.key(&keys::event(last + 1)),
                );
                Ok((doomed.len(), vec![], vec![op]))
            })
            .await
    }

    async fn purge_user_state(
        &self,
        older_than: Timestamp,
        now: Timestamp,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        let start = cursor.unwrap_or_else(|| vec![keys::LAST_SEEN]);
        let (stale, last) = {
            let state = self.inner.mirror.read();
            let mut stale = Vec::new();
            let mut last = None;
            for (key, v) in state
                .other
                .range::<Vec<u8>, _>((
                    Bound::Excluded(start),
                    Bound::Excluded(vec![keys::CREATIONS + 1]),
                ))
                .take(limit)
            {
                let kind = key.first().copied().unwrap_or_default();
                if super::user_record_is_stale(kind, &v.value, older_than, now)? {
                    stale.push((key.clone(), v.revision));
                }
                last = Some(key.clone());
            }
            (stale, last)
        };
        let mut purged = 0;
        for chunk in stale.chunks(CHUNK * 2) {
            // Each record only if nobody wrote it since it was found stale.
            for (key, revision) in chunk {
                let txn = Txn {
                    compare: vec![unchanged(self.inner.key(key), *revision)],
                    ops: vec![delete(self.inner.key(key))],
                };
                if self.inner.commit(txn).await? {
                    purged += 1;
                }
            }
        }
        Ok((purged, last))
    }

    async fn prune_audit(&self, older_than: Timestamp, limit: usize) -> Result<usize> {
        self.inner
            .write_with(|state| {
                let mut doomed = Vec::new();
                for (key, v) in state
                    .other
                    .range(vec![keys::AUDIT]..vec![keys::AUDIT + 1])
                    .take(limit)
                {
                    let record: AuditEntry = serde_json::from_slice(&v.value)
                        .map_err(|_| Error::Storage("corrupt audit record".into()))?;
                    if record.at >= older_than {
                        break;
                    }
                    doomed.push(key.clone());
                }
                let (Some(first), Some(last)) = (doomed.first(), doomed.last()) else {
                    return Ok((0, vec![], vec![]));
                };
                let mut end = last.clone();
                end.push(0);
                // The audit head key is written by every append, so ids never repeat.
                let op = delete_range(self.inner.key(first), self.inner.key(&end));
                Ok((doomed.len(), vec![], vec![op]))
            })
            .await
    }

    fn touch(&self, id: SessionId, now: Timestamp) {
        let mut touches = lock(&self.inner.touches);
        let at = touches.entry(id).or_insert(now);
        *at = (*at).max(now);
    }

    fn end_soon(&self, id: SessionId, policy: Arc<Policy>, now: Timestamp) {
        if !lock(&self.inner.ending).insert(id) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.enforce(vec![id], policy, now).await {
                tracing::debug!(error = %e, "ending a session past its deadline failed; the sweeper will");
            }
            lock(&inner.ending).remove(&id);
        });
    }

    fn policy_version(&self) -> u64 {
        self.inner.mirror.read().policy_version
    }

    fn runs_background_work(&self) -> bool {
        self.inner.leads()
    }

    async fn fence(&self) -> Result<()> {
        if self.inner.no_read_fence {
            return Ok(());
        }
        let ticket = self.inner.fence_wanted.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.fence_wake.notify_one();
        let mut served = self.inner.fence_served.subscribe();
        let held = tokio::time::timeout(FENCE_TIMEOUT, served.wait_for(|s| *s >= ticket))
            .await
            .is_ok_and(|r| r.is_ok());
        match held {
            true => Ok(()),
            false => Err(Error::Storage(
                "cannot confirm with etcd that this replica is up to date (no quorum?)".into(),
            )),
        }
    }

    async fn close(&self) -> Result<()> {
        let _ = self.inner.stop.send(true);
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod loading {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        model::{
            event::EventKind,
            session::{Device, SessionState},
        },
        token::TokenGenerator,
    };

    fn rss_mib() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// Keys and values, as a restore takes them.
    type Entries = Vec<(Vec<u8>, Vec<u8>)>;

    /// `n` sessions of one user each on `device`, with their created events unless `events` is
    /// false; and the sessions' ids.
    fn store_of(n: u64, events: bool, device: &Device) -> (Entries, Vec<SessionId>) {
        let g = TokenGenerator::from_seed([7; 32]);
        let mut entries = Vec::new();
        let mut ids = Vec::new();
        for i in 0..n {
            let now = Timestamp::from_millis(1_800_000_000_000 + i);
            let id = g.session_id(now);
            let s = Session {
                id,
                tenant_id: "t".into(),
                user_id: format!("user-{i}"),
                token_hash: g.issue(&id).hash,
                created_at: now,
                last_seen_at: now,
                idle_timeout: Duration::from_secs(1800),
                absolute_expires_at: now.saturating_add(Duration::from_secs(43_200)),
                remember_me: false,
                device: device.clone(),
                attributes: BTreeMap::new(),
                state: SessionState::Active,
                rotation_count: 0,
                max_age_at: None,
                flags: Vec::new(),
                replaced: Vec::new(),
                new_device: false,
                new_place: false,
                binding: None,
                purge_at: None,
            };
            let e = Event {
                sequence: i + 1,
                occurred_at: now,
                tenant_id: s.tenant_id.clone(),
                user_id: s.user_id.clone(),
                session_id: id,
                kind: EventKind::Created {
                    device: device.clone(),
                    remember_me: false,
                    evicted: Vec::new(),
                    new_device: false,
                    new_place: false,
                },
            };
            entries.push((keys::session(&id).to_vec(), records::encode_session(&s)));
            if events {
                entries.push((keys::event(i + 1).to_vec(), records::encode_event(&e)));
            }
            ids.push(id);
        }
        entries.push((keys::META_SECRET.to_vec(), vec![9; 32]));
        (entries, ids)
    }

    fn options(cluster: &local::LocalCluster) -> EtcdOptions {
        EtcdOptions {
            endpoints: cluster.endpoints(),
            ..EtcdOptions::default()
        }
    }

    /// A replica's copy is read in pages of at most 10,000 keys, read ahead of applying them: a
    /// store of several pages opens with every session and every event, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_of_many_read_pages_opens_whole() {
        let n = 12_000;
        let etcd = local::find_etcd().expect("an etcd binary");
        let cluster = local::LocalCluster::start(&etcd, 1, None).expect("etcd");
        let (entries, ids) = store_of(n, true, &Device::default());
        EtcdStore::restore_entries(options(&cluster), "/pages/", &entries)
            .await
            .expect("restore");
        let store = EtcdStore::open(
            options(&cluster),
            "/pages/",
            4096,
            Duration::from_secs(86_400),
        )
        .await
        .expect("open");
        for id in &ids {
            assert!(store.get(id).expect("get").is_some(), "session {id:?} lost");
        }
        let sequences: Vec<u64> = store
            .events_after(0, 2 * n as usize)
            .expect("events")
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(sequences, (1..=n).collect::<Vec<_>>());
        store.close().await.expect("close");
    }

    /// How long a replica takes to open a store of `SIZE_SESSIONS` sessions (each with its
    /// created event, unless `SIZE_NO_EVENTS`), and the memory its copy takes. A measurement,
    /// not a check: `SIZE_SESSIONS=1000000 cargo test --release --lib open_at_size -- --ignored
    /// --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement: minutes at a million sessions"]
    async fn open_at_size() {
        let n: u64 = std::env::var("SIZE_SESSIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let etcd = local::find_etcd().expect("an etcd binary");
        let cluster = local::LocalCluster::start(&etcd, 3, Some(8 << 30)).expect("etcd");
        let options = options(&cluster);
        // SIZE_BROWSER: each session and event carries a browser's IP, User-Agent and label,
        // as `session-bench scale` creates them.
        let device = match std::env::var_os("SIZE_BROWSER") {
            None => Device::default(),
            Some(_) => Device {
                ip: "203.0.113.7".parse().ok(),
                user_agent: "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 \
                    (KHTML, like Gecko) Version/17.4 Safari/605.1.15"
                    .into(),
                label: "MacBook Pro".into(),
                location: None,
            },
        };
        let events = std::env::var_os("SIZE_NO_EVENTS").is_none();
        let (entries, _) = store_of(n, events, &device);
        let started = std::time::Instant::now();
        EtcdStore::restore_entries(options.clone(), "/size/", &entries)
            .await
            .expect("restore");
        println!("loaded {n} sessions into etcd in {:?}", started.elapsed());
        drop(entries);
        let before = rss_mib();
        let started = std::time::Instant::now();
        let store = EtcdStore::open(options, "/size/", 4096, Duration::from_secs(86_400))
            .await
            .expect("open");
        println!(
            "opened {n} sessions in {:?}; copy {:.0} MiB (RSS {:.0} MiB)",
            started.elapsed(),
            rss_mib() - before,
            rss_mib()
        );
        drop(store);
    }
}

#[cfg(test)]
mod compares {
    use super::*;

    /// A user's guard is compared as "not written after the copy's revision" (the copy does not
    /// keep guards): a write planned on a copy at revision R commits while the guard was last
    /// written at or before R, or never, and fails once anyone wrote it after R.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_written_after_the_copys_revision_fails_the_compare() {
        let etcd = local::find_etcd().expect("an etcd binary");
        let cluster = local::LocalCluster::start(&etcd, 1, None).expect("etcd");
        let client = EtcdClient::new(&EtcdOptions {
            endpoints: cluster.endpoints(),
            ..EtcdOptions::default()
        })
        .expect("client");
        let guard = keys::per_user(keys::GUARD, "t", "u");
        let commits = |copy_at: i64| {
            let (client, guard) = (&client, guard.clone());
            async move {
                client
                    .txn(TxnRequest {
                        compare: vec![not_written_after(guard, copy_at)],
                        success: vec![],
                        failure: vec![],
                    })
                    .await
                    .expect("txn")
                    .succeeded
            }
        };
        let write = || async {
            let reply = client
                .txn(TxnRequest {
                    compare: vec![],
                    success: vec![put(guard.clone(), Vec::new())],
                    failure: vec![],
                })
                .await
                .expect("put");
            reply.header.map_or(0, |h| h.revision)
        };
        assert!(commits(1).await, "never written");
        let first = write().await;
        assert!(commits(first).await, "written at the copy's revision");
        assert!(
            !commits(first - 1).await,
            "written after the copy's revision"
        );
        let second = write().await;
        assert!(
            !commits(first).await,
            "written again after the copy's revision"
        );
        assert!(commits(second).await);
    }
}

#[cfg(test)]
mod guards {
    use std::sync::Arc;

    use super::*;
    use crate::{
        clock::{Clock, ManualClock},
        config::Config,
        model::{policy::Policy, session::RevokeReason},
        sessions::{policies::Policies, NewSession, Sessions},
        token::TokenGenerator,
    };

    const PREFIX: &str = "/guards/";

    /// A replica on `cluster`, and the sessions service over it.
    async fn replica(
        cluster: &local::LocalCluster,
        clock: Arc<ManualClock>,
    ) -> (Arc<EtcdStore>, Sessions<EtcdStore>) {
        let options = EtcdOptions {
            endpoints: cluster.endpoints(),
            ..EtcdOptions::default()
        };
        let store = Arc::new(
            EtcdStore::open(options, PREFIX, 4096, Duration::from_secs(86_400))
                .await
                .expect("open"),
        );
        let mut policy = Policy::from(&Config::default());
        policy.max_sessions_per_user = 2;
        let policies = Arc::new(Policies::load(store.clone(), policy).expect("policies"));
        let tokens = TokenGenerator::from_os().expect("seed");
        let sessions = Sessions::new(
            store.clone(),
            clock,
            tokens,
            policies,
            Duration::from_secs(10),
        );
        (store, sessions)
    }

    fn login(user: &str) -> NewSession {
        NewSession {
            tenant_id: "t".into(),
            user_id: user.into(),
            remember_me: false,
            device: Default::default(),
            attributes: Default::default(),
            binding_key: None,
        }
    }

    /// Whether etcd holds the guard of user `user` of tenant "t".
    async fn guarded(store: &EtcdStore, user: &str) -> bool {
        let key = store.inner.key(&keys::per_user(keys::GUARD, "t", user));
        let read = RangeRequest {
            key,
            count_only: true,
            ..Default::default()
        };
        store.inner.client.range(read).await.expect("range").count == 1
    }

    /// A one-member etcd, and the clock its replicas share.
    fn cluster_and_clock() -> (local::LocalCluster, Arc<ManualClock>) {
        let etcd = local::find_etcd().expect("an etcd binary");
        let cluster = local::LocalCluster::start(&etcd, 1, None).expect("etcd");
        let start = Timestamp::from_millis(1_767_225_600_000);
        (cluster, Arc::new(ManualClock::new(start)))
    }

    fn by_id(id: SessionId) -> RevokeTarget {
        RevokeTarget::Sessions {
            ids: vec![id],
            tenant: None,
        }
    }

    /// etcd keeps a guard for each user with sessions, not for each user ever seen: the write
    /// that ends a user's last session deletes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guard_lives_while_its_user_has_sessions() {
        let (cluster, clock) = cluster_and_clock();
        let (store, sessions) = replica(&cluster, clock.clone()).await;
        let first = sessions.create(login("u")).await.expect("create");
        clock.advance(Duration::from_secs(1));
        let second = sessions.create(login("u")).await.expect("create");
        assert!(guarded(&store, "u").await);
        // At the limit (2), a third login evicts the first (least recently used): the set
        // changes, never empty.
        clock.advance(Duration::from_secs(1));
        let third = sessions.create(login("u")).await.expect("create");
        assert!(!sessions.get(&first.session.id).is_ok_and(|s| s.is_active()));
        assert!(guarded(&store, "u").await);
        sessions
            .revoke(by_id(second.session.id), RevokeReason::Admin)
            .await
            .expect("revoke");
        assert!(guarded(&store, "u").await, "one session left");
        sessions
            .revoke(by_id(third.session.id), RevokeReason::Admin)
            .await
            .expect("revoke");
        assert!(!guarded(&store, "u").await, "no session left");
        // The next login guards the set again.
        sessions.create(login("u")).await.expect("create");
        assert!(guarded(&store, "u").await);
        store.close().await.expect("close");
    }

    /// A replica whose copy has not seen a new session of a user ends the user's other session:
    /// by its copy the set is then empty, but its delete of the guard must not commit, or a
    /// later compare would pass without noticing the new session. (A write with events also
    /// compares the log's head; this one has none, so the guard alone must hold.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lagging_copy_never_deletes_the_guard_of_a_set_that_grew() {
        let (cluster, clock) = cluster_and_clock();
        let (a_store, a) = replica(&cluster, clock.clone()).await;
        let (b_store, _b) = replica(&cluster, clock.clone()).await;
        let old = a.create(login("u")).await.expect("create");
        for _ in 0..500 {
            if b_store.get(&old.session.id).expect("get").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b_store.hold_watch(true);
        let new = a.create(login("u")).await.expect("create");
        let txn = {
            let state = b_store.inner.mirror.read();
            assert!(!state.has_session(&new.session.id), "b's copy lags");
            let view = Recording::new(&state, &*b_store.inner);
            let mut planner = Planner::new(
                &view,
                Plan::new(state.head().expect("head"), Duration::ZERO),
            );
            planner
                .revoke(by_id(old.session.id), RevokeReason::Admin, clock.now())
                .expect("plan");
            let mut plan = planner.plan;
            plan.events.clear();
            plan.head = state.head().expect("head");
            let reads = view.reads.into_inner();
            b_store
                .inner
                .txn_for(&state, &reads, vec![plan])
                .expect("txn")
        };
        let guard = b_store.inner.key(&keys::per_user(keys::GUARD, "t", "u"));
        assert!(
            txn.ops.iter().any(|op| matches!(
                &op.request,
                Some(client::request_op::Request::RequestDeleteRange(d)) if d.key == guard
            )),
            "by b's copy the set is empty, so the write deletes the guard"
        );
        b_store.hold_watch(false);
        assert!(
            !b_store.inner.commit(txn).await.expect("commit"),
            "a copy without the new session deleted the guard"
        );
        assert!(guarded(&a_store, "u").await);
        assert!(a
            .validate(new.token.expose(), false, None, None)
            .await
            .is_ok());
        a_store.close().await.expect("close");
        b_store.close().await.expect("close");
    }
}
