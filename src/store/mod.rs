//! Durable state: sessions, their indexes and the event log. The only code that touches sled
//! (`sled_store`) or etcd (`etcd`).
//!
//! The domain talks to a [`SessionStore`]: reads are plain calls, writes are whole operations
//! (create with limit enforcement, revoke, rotate, sweep) that a store applies atomically, each
//! with the events it causes, and acknowledges only once durable. The decisions inside them are
//! the planners of `model::plan`, run against the store's view: a backend offers the view, runs
//! the planner, and commits the plan atomically and durably. It decides nothing itself.

pub mod etcd;
mod keys;
mod records;
mod session_cache;
pub use session_cache::CacheStats;
mod sled_store;
pub mod snapshot;
mod touch_log;

use std::{
    future::Future,
    sync::{Arc, LazyLock},
};

pub use etcd::{EtcdOptions, EtcdStore};
pub use sled_store::SledStore;

// The plan types are the store's vocabulary too: what a write is asked to do and what it did.
pub use crate::model::plan::{
    CreateOutcome, CreateRules, Defence, Defended, PolicyOf, RevokeOutcome, RevokeTarget,
    RotateOutcome, Rotation,
};

use crate::{
    clock::Timestamp,
    error::Result,
    events::EventBus,
    model::{
        audit::AuditEntry,
        event::Event,
        policy::Policy,
        session::{Location, RevokeReason, Session},
        travel::{LastSeen, TravelRules},
    },
    token::SessionId,
};

/// Bounds how many long store reads (replays, scans for stats, bulk work, audit listings) run at
/// once: each runs on a blocking thread, never on an async worker, so that health, validate and
/// every stream keep their workers however many scans are asked for.
static SCANS: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    tokio::sync::Semaphore::new(cores.div_ceil(2))
});

/// Runs `read` (a store read that may walk many keys) on a blocking thread, at most half the cores'
/// worth at a time. Callers keep each `read` to a page of work and await between pages.
pub async fn scan<T, F>(read: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let _permit = SCANS
        .acquire()
        .await
        .map_err(|_| crate::error::Error::ShuttingDown)?;
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| crate::error::Error::Storage(format!("a store scan failed: {e}")))?
}

/// What a policy write makes of a tenant's stored policy (`None`: none stored); `None` deletes
/// it. The store runs it inside the write, on the very policy the write replaces, and again if
/// the write is retried: so a partial update made through one replica never undoes one made
/// through another meanwhile.
pub type PolicyChange = Arc<dyn Fn(Option<&Policy>) -> Result<Option<Policy>> + Send + Sync>;

/// Which sessions a list covers.
#[derive(Debug, Clone)]
pub struct ListScope {
    pub tenant_id: String,
    pub user_id: Option<String>,
}

/// Where a listing of `scope` starts: just after `cursor` (which must come from this listing),
/// else at its first key; and the key prefix it covers. One rule for both backends' indexes.
fn list_start(
    scope: &ListScope,
    cursor: Option<&[u8]>,
) -> Result<(Vec<u8>, std::ops::Bound<Vec<u8>>)> {
    use std::ops::Bound;
    let prefix = keys::user_prefix(&scope.tenant_id, scope.user_id.as_deref());
    let start = match cursor {
        Some(c) if !c.starts_with(&prefix) => {
            return Err(crate::error::Error::invalid(
                "page_token",
                "does not belong to this listing",
            ))
        }
        Some(c) => Bound::Excluded(c.to_vec()),
        None => Bound::Included(prefix.clone()),
    };
    Ok((prefix, start))
}

/// What becomes of a per-user record of `kind` (one of `keys::USER_RECORD_KINDS`; any other is
/// kept): a last place seen before `older_than` goes, as does a login history with no login
/// since then, and a login quota with no creation in the day before `now`. A kept place or
/// history says when it was last written, for the sweeper's count of them. The rule of every
/// backend's `purge_user_state`.
fn user_record_fate(
    kind: u8,
    value: &[u8],
    older_than: Timestamp,
    now: Timestamp,
) -> Result<RecordFate> {
    let day_ago = now.saturating_sub(std::time::Duration::from_secs(86_400));
    let latest = match kind {
        keys::LAST_SEEN => records::decode_last_seen(value)?.at,
        keys::LOGINS => records::decode_logins(value)?
            .iter()
            .map(|l| l.at)
            .max()
            .unwrap_or(Timestamp::from_millis(0)),
        keys::CREATIONS => {
            let stale = records::decode_creations(value)
                .iter()
                .all(|t| *t <= day_ago);
            return Ok(if stale {
                RecordFate::Stale
            } else {
                RecordFate::Kept(None)
            });
        }
        _ => return Ok(RecordFate::Kept(None)),
    };
    Ok(if latest < older_than {
        RecordFate::Stale
    } else {
        RecordFate::Kept(Some(latest))
    })
}

/// See `user_record_fate`.
enum RecordFate {
    Stale,
    /// Kept; when a place or login history was last written.
    Kept(Option<Timestamp>),
}

/// One call's worth of `purge_user_state`.
#[derive(Debug, Default)]
pub struct UserStatePage {
    /// Records deleted.
    pub purged: usize,
    /// Where the next call goes on from; `None` at the end of a pass.
    pub next: Option<Vec<u8>>,
    /// When each place or login history kept was last written: the sweeper counts them.
    pub kept: Vec<Timestamp>,
}

/// Whether audit record `id`, made `at`, goes: it is older than `older_than`, or `keep` newer
/// ones follow it up to the newest kept, `newest` (ids are given in order and never reused, so
/// that is a count). The rule of every backend's `prune_audit`: every replica holds the trail
/// in memory, so time alone must not bound it.
fn audit_is_stale(id: u64, at: Timestamp, newest: u64, older_than: Timestamp, keep: u64) -> bool {
    at < older_than || id.saturating_add(keep) <= newest
}

/// The deadline-index keys of every session due at `now`.
fn due_range(now: Timestamp) -> std::ops::RangeInclusive<[u8; 25]> {
    let first = keys::deadline(Timestamp::from_millis(0), &SessionId::from_bytes([0; 16]));
    first..=keys::deadline(now, &SessionId::from_bytes([0xff; 16]))
}

/// One page of a listing. `next` is an opaque cursor, `None` at the end.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub sessions: Vec<Session>,
    pub next: Option<Vec<u8>>,
}

/// The bounds of the event log: events `first..=head` can be read (`first` is `head + 1` when the
/// log is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    pub first: u64,
    pub head: u64,
}

/// Storage for sessions and their event log.
///
/// Every write method returns only once its change and its events are durable, or fails having
/// acknowledged nothing. Events reach the [`crate::events::EventBus`] after that, in sequence
/// order.
pub trait SessionStore: Send + Sync + 'static {
    /// A session by id, live or tombstone.
    fn get(&self, id: &SessionId) -> Result<Option<Session>>;

    /// Active sessions in `scope`, ordered by user, creation time and id, after `cursor`. May
    /// include sessions past a deadline that the sweeper has not ended yet.
    fn list(&self, scope: &ListScope, cursor: Option<&[u8]>, limit: usize) -> Result<ListPage>;

    /// Ids of sessions whose next deadline is at or before `now`, oldest first.
    fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<SessionId>>;

    /// Durable events with `sequence > after`, at most `limit`, in order.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>>;

    /// Calls `visit` for each durable event that occurred at or after `since`, newest first.
    fn visit_events_since(&self, since: Timestamp, visit: &mut dyn FnMut(&Event)) -> Result<()>;

    /// What the event log holds now (durable part only).
    fn log_bounds(&self) -> Result<LogBounds>;

    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64>;

    /// The sessions held in memory in front of the store, for the metrics; `None` for a backend
    /// that holds every session in memory anyway (etcd's replicas).
    fn cache_stats(&self) -> Option<CacheStats> {
        None
    }

    /// The fan-out this store publishes its durable events to.
    fn events(&self) -> Arc<EventBus>;

    /// Whether the store can take writes. False after an I/O failure, until a restart.
    fn is_healthy(&self) -> bool;

    /// Stores a new session under `rules`: the login quota (`ResourceExhausted`), impossible
    /// travel (`PermissionDenied` for REJECT and REVOKE, a flag for FLAG), and the per-user limit
    /// (expiring the user's sessions past a deadline, then evicting the least recently used or
    /// refusing with `ResourceExhausted`).
    fn create(
        &self,
        session: Session,
        rules: CreateRules,
    ) -> impl Future<Output = Result<CreateOutcome>> + Send;

    /// Applies a (tightened) policy to these sessions: shorter timeouts and the maximum age are
    /// stored, and sessions already past a deadline under it are ended, with their events.
    /// Returns how many changed.
    fn enforce(
        &self,
        ids: Vec<SessionId>,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Records that live session `id` was seen at `location` and checks it for impossible travel
    /// against the user's last known place. Returns the session as it is now (with a new flag
    /// for FLAG and REJECT), or `SessionNotValid` if it is not live or REVOKE ended it.
    fn observe(
        &self,
        id: SessionId,
        location: Location,
        now: Timestamp,
        rules: TravelRules,
    ) -> impl Future<Output = Result<Session>> + Send;

    /// A user's last known place.
    fn last_seen(&self, tenant_id: &str, user_id: &str) -> Result<Option<LastSeen>>;

    /// Every stored tenant policy.
    fn policies(&self) -> Result<Vec<(String, Policy)>>;

    /// Stores (`Some`) or deletes (`None`) the policy `change` makes of the tenant's stored one,
    /// durably, with a mark that its open sessions are yet to be enforced (see
    /// `pending_enforcements`). Returns whether one existed, and what was stored.
    fn put_policy(
        &self,
        tenant_id: String,
        change: PolicyChange,
    ) -> impl Future<Output = Result<(bool, Option<Policy>)>> + Send;

    /// Tenants whose policy changed (by `put_policy`) and whose open sessions have not all been
    /// enforced since: a restart resumes their enforcement.
    fn pending_enforcements(&self) -> Result<Vec<String>>;

    /// The mark `put_policy` left for `tenant`, if its enforcement is pending.
    fn enforcement_pending(&self, tenant_id: &str) -> Result<Option<u64>>;

    /// Clears `tenant`'s mark if it is still `mark` (a newer policy write keeps its own).
    fn enforcement_done(
        &self,
        tenant_id: String,
        mark: u64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// 32 random bytes made with the store: keys values that must be stable and unguessable.
    fn installation_secret(&self) -> [u8; 32];

    /// The identity of the event log's timeline: sequence numbers are comparable only within
    /// one epoch. Changes when the store is restored from a backup.
    fn log_epoch(&self) -> u64;

    /// Appends an entry to the audit trail, durably; its `id` is assigned here and returned.
    /// 0 (never an id) if the store is full and the entry is written once space returns: the
    /// etcd backend's revocations on a full store are audited that way, not refused.
    fn append_audit(&self, entry: AuditEntry) -> impl Future<Output = Result<u64>> + Send;

    /// Writes a consistent snapshot of the whole store to `path` (see `snapshot`); returns
    /// the number of entries. Writes wait meanwhile; the reply comes once every write in the
    /// snapshot is durable.
    fn snapshot(&self, path: std::path::PathBuf) -> impl Future<Output = Result<u64>> + Send;

    /// Audit entries with `id > after`, oldest first, at most `limit`.
    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>>;

    /// Replaces the token hash of session `id` if its current hash is `current` and it is live
    /// under `policy` (its tenant's, in force now). `SessionNotValid` otherwise; a session found
    /// past a deadline is ended.
    fn rotate(
        &self,
        id: SessionId,
        rotation: Rotation,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> impl Future<Output = Result<RotateOutcome>> + Send;

    /// Applies a hijacking defence (see [`Defence`]) to live session `id` under `policy` (its
    /// tenant's, in force now). `SessionNotValid` if the session is not live; a session found
    /// past a deadline is ended.
    fn defend(
        &self,
        id: SessionId,
        defence: Defence,
        policy: Arc<Policy>,
        now: Timestamp,
    ) -> impl Future<Output = Result<Defended>> + Send;

    /// Revokes the target's active sessions. Sessions already ended are skipped, not an error;
    /// sessions found past a deadline are expired instead.
    fn revoke(
        &self,
        target: RevokeTarget,
        reason: RevokeReason,
        now: Timestamp,
    ) -> impl Future<Output = Result<RevokeOutcome>> + Send;

    /// Ends each listed session that is past a deadline under its tenant's policy in force
    /// (`policy_of`; one event each), purges
    /// tombstones past their absolute deadline, and re-files the rest. Returns how many expired.
    fn sweep(
        &self,
        ids: Vec<SessionId>,
        policy_of: PolicyOf,
        now: Timestamp,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Deletes events older than `older_than`, and the oldest beyond `keep`. Returns how many.
    fn prune_events(
        &self,
        older_than: Timestamp,
        keep: u64,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Deletes per-user records nobody needs any more, reading no more than `limit` keys after
    /// `cursor` (so each call is short; on sled these include a key of each user's sessions,
    /// beside which its records are kept): last known places seen before `older_than`, login
    /// histories with no login since then, and login-quota records with no creation in the day
    /// before `now` (see `user_record_fate`). Returns how many it deleted, where to go on from
    /// (`None` at the end: start again from the beginning), and when each place and login
    /// history it kept was last written.
    fn purge_user_state(
        &self,
        older_than: Timestamp,
        now: Timestamp,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> impl Future<Output = Result<UserStatePage>> + Send;

    /// Deletes audit records from before `older_than`, and the oldest beyond the newest `keep`
    /// (see `audit_is_stale`), oldest first, at most `limit`. Ids are never reused afterwards.
    /// Returns how many.
    fn prune_audit(
        &self,
        older_than: Timestamp,
        keep: u64,
        limit: usize,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Records a use of a live session, best effort and without waiting: it becomes durable with
    /// the next flush. Dropped if the store is busy, which only makes `last_seen_at` coarser.
    fn touch(&self, id: SessionId, now: Timestamp);

    /// Asks for a session found past a deadline (under `policy`) to be ended, without waiting (a
    /// validate must answer at once). Exactly one event results, however often this is called.
    fn end_soon(&self, id: SessionId, policy: Arc<Policy>, now: Timestamp);

    /// Changes whenever tenant policies change in the store by any other way than this process's
    /// `put_policy` (another replica's write): the policy registry reloads when it moves. A single
    /// process is the only writer of its policies, so 0 for ever.
    fn policy_version(&self) -> u64 {
        0
    }

    /// Whether this process runs the background work (sweeper, retention): with several
    /// replicas, the elected one. A single process always does.
    fn runs_background_work(&self) -> bool {
        true
    }

    /// Returns once this store's reads reflect every write acknowledged (by any replica) before
    /// the call began: a validate after a revoke's reply must refuse, whichever replica revoked.
    /// A single process has nothing to wait for.
    fn fence(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Finishes queued writes, flushes and stops taking writes.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;
}
