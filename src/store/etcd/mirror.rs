//! A replica's copy of everything under the deployment's prefix, kept current by one etcd watch.
//!
//! Every read of the store (validate, list, due, replay) is answered from here, in memory, at one
//! etcd revision; the indexes that sled keeps as keys (a user's active sessions, deadlines) are
//! kept here instead, so a write puts fewer keys. Writers read through [`Recording`], which notes
//! the revision of every key a planner looked at: the commit compares them, so a plan made from a
//! copy that is behind fails instead of overwriting a newer change.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, RwLock},
};

use tokio::sync::watch;

use super::client::pb::mvccpb;
use crate::{
    clock::Timestamp,
    error::{Error, Result},
    events::EventBus,
    model::login::Login,
    model::{
        event::Event,
        plan::{Plan, View},
        session::Session,
        travel::LastSeen,
    },
    store::{keys, records},
    token::SessionId,
};

/// A key's value and the revision that last changed it.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: i64,
}

/// The kinds of key kept in `State::other`: meta records, policies, per-user records, audit
/// entries and enforcement marks.
const KEPT_KINDS: [u8; 7] = [
    keys::META,
    keys::POLICY,
    keys::LAST_SEEN,
    keys::CREATIONS,
    keys::LOGINS,
    keys::AUDIT,
    keys::ENFORCE,
];

/// Whether a key (without the prefix) is of a kind this version keeps: what a backup takes.
pub fn is_kept(key: &[u8]) -> bool {
    key.first()
        .is_some_and(|k| [keys::SESSION, keys::EVENT].contains(k) || KEPT_KINDS.contains(k))
}

/// Where another deployment's store starts, if `key` (below this deployment's prefix) is its
/// format record: `<sub>/mformat` holding a format of this service.
fn another_deployment<'k>(key: &'k [u8], value: Option<&[u8]>) -> Option<&'k [u8]> {
    let at = key.strip_suffix(keys::META_FORMAT)?;
    (at.ends_with(b"/") && value.is_some_and(|v| v.starts_with(b"session-authority/")))
        .then_some(at)
}

/// The replica's copy, at `revision`.
#[derive(Default)]
pub struct State {
    /// Every change up to this etcd revision is applied.
    pub revision: i64,
    /// Each session as etcd holds it (encoded), and its revision. Decoded when read: a decoded
    /// session takes about three times the memory (its strings, map and vectors each an
    /// allocation), and a replica holds every session.
    sessions: HashMap<SessionId, (Box<[u8]>, i64)>,
    /// `keys::user_session` of each active session: a user's sessions, listings.
    pub users: BTreeSet<Vec<u8>>,
    /// `keys::deadline` of each session: what the sweeper looks at next.
    pub deadlines: BTreeSet<[u8; 25]>,
    /// The log, as stored (encoded): a third of the memory of decoded events, and a replica
    /// holds every event kept. Decoded when read.
    pub events: BTreeMap<u64, Box<[u8]>>,
    /// Everything else (meta, policies, per-user records, audit, marks), by key; not users'
    /// guards.
    pub other: BTreeMap<Vec<u8>, Versioned>,
    /// Bumped by every change of a tenant policy.
    pub policy_version: u64,
}

impl State {
    /// Adds a page of what a range read returned (keys still carry `prefix`).
    pub fn load_page(&mut self, prefix: &[u8], kvs: &[mvccpb::KeyValue]) -> Result<()> {
        for kv in kvs {
            let key = kv.key.strip_prefix(prefix).unwrap_or(&kv.key);
            self.apply(key, Some(&kv.value), kv.mod_revision)?;
        }
        Ok(())
    }

    /// The session `id`, decoded.
    pub fn session(&self, id: &SessionId) -> Result<Option<Session>> {
        self.sessions
            .get(id)
            .map(|(value, _)| records::decode_session(*id, value))
            .transpose()
    }

    pub fn has_session(&self, id: &SessionId) -> bool {
        self.sessions.contains_key(id)
    }

    /// The revision of `key` (0: absent), for a commit's compare.
    pub fn revision_of(&self, key: &[u8]) -> i64 {
        match key.first() {
            Some(&keys::SESSION) => SessionId::from_slice(&key[1..])
                .and_then(|id| self.sessions.get(&id))
                .map_or(0, |(_, r)| *r),
            _ => self.other.get(key).map_or(0, |v| v.revision),
        }
    }

    pub fn u64_at(&self, key: &[u8]) -> Result<u64> {
        match self.other.get(key) {
            None => Ok(0),
            Some(v) => Ok(u64::from_be_bytes(v.value.as_slice().try_into().map_err(
                |_| {
                    Error::Storage(format!(
                        "corrupt meta record {}",
                        String::from_utf8_lossy(key)
                    ))
                },
            )?)),
        }
    }

    /// The newest sequence ever assigned.
    pub fn head(&self) -> Result<u64> {
        let last = self.events.keys().next_back().copied().unwrap_or(0);
        Ok(self.u64_at(keys::META_HEAD)?.max(last))
    }

    /// A user's active sessions, by creation time.
    pub fn user_sessions(&self, tenant: &str, user: &str) -> Result<Vec<Session>> {
        self.user_session_ids(tenant, user)
            .iter()
            .filter_map(|id| self.session(id).transpose())
            .collect()
    }

    /// The ids of a user's active sessions, by creation time.
    pub fn user_session_ids(&self, tenant: &str, user: &str) -> Vec<SessionId> {
        let prefix = keys::user_prefix(tenant, Some(user));
        self.users
            .range(prefix.clone()..)
            .take_while(|k| k.starts_with(&prefix))
            .filter_map(|k| keys::session_id_of_user_key(k))
            .filter(|id| self.sessions.contains_key(id))
            .collect()
    }

    fn unindex(&mut self, s: &Session) {
        self.deadlines
            .remove(&keys::deadline(s.next_deadline(), &s.id));
        if s.is_active() {
            self.users.remove(&keys::user_session(
                &s.tenant_id,
                &s.user_id,
                s.created_at,
                &s.id,
            ));
        }
    }

    fn index(&mut self, s: &Session) {
        self.deadlines
            .insert(keys::deadline(s.next_deadline(), &s.id));
        if s.is_active() {
            self.users.insert(keys::user_session(
                &s.tenant_id,
                &s.user_id,
                s.created_at,
                &s.id,
            ));
        }
    }

    /// The events of `range`, decoded, in order.
    pub fn events_in(
        &self,
        range: impl std::ops::RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = Result<Event>> + '_ {
        self.events
            .range(range)
            .map(|(seq, value)| records::decode_event(*seq, value))
    }

    /// Applies one change (key without the prefix). Returns the sequence of the event it
    /// added, if any.
    pub fn apply(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        revision: i64,
    ) -> Result<Option<u64>> {
        if let Some(at) = another_deployment(key, value) {
            return Err(Error::DataDir(format!(
                "another deployment's store lies inside this one's prefix, at {:?} below it: \
                 give each deployment a prefix that no other starts with",
                String::from_utf8_lossy(at)
            )));
        }
        match key.first() {
            Some(&keys::SESSION) => {
                let id = SessionId::from_slice(&key[1..])
                    .ok_or_else(|| Error::Storage("corrupt session key in etcd".into()))?;
                if let Some((old, _)) = self.sessions.remove(&id) {
                    self.unindex(&records::decode_session(id, &old)?);
                }
                if let Some(value) = value {
                    self.index(&records::decode_session(id, value)?);
                    self.sessions.insert(id, (value.into(), revision));
                }
                Ok(None)
            }
            Some(&keys::EVENT) => {
                let seq = keys::parse_event(key)
                    .ok_or_else(|| Error::Storage("corrupt event key in etcd".into()))?;
                match value {
                    Some(value) => {
                        self.events.insert(seq, value.into());
                        Ok(Some(seq))
                    }
                    None => {
                        self.events.remove(&seq);
                        Ok(None)
                    }
                }
            }
            // Compared without their revisions (see `store::etcd`): one key per user with
            // sessions.
            Some(&keys::GUARD) => Ok(None),
            Some(kind) if !KEPT_KINDS.contains(kind) => {
                // A kind this version does not know (a newer version's): not ours to read.
                tracing::debug!(kind = %char::from(*kind), "skipping an etcd key of unknown kind");
                Ok(None)
            }
            None => Ok(None),
            _ => {
                if key.first() == Some(&keys::POLICY) {
                    self.policy_version += 1;
                }
                match value {
                    Some(value) => {
                        self.other.insert(
                            key.to_vec(),
                            Versioned {
                                value: value.to_vec(),
                                revision,
                            },
                        );
                    }
                    None => {
                        self.other.remove(key);
                    }
                }
                Ok(None)
            }
        }
    }
}

/// The copy, shared by the store's readers, its writer and its watch.
pub struct Mirror {
    prefix: Vec<u8>,
    state: RwLock<State>,
    applied: watch::Sender<i64>,
    bus: Arc<EventBus>,
    /// `State::policy_version` as last applied, readable without the copy's lock: every
    /// validate asks for it (through the policy registry), and a planner may too, while its
    /// write holds the lock for reading (a second read then could wait behind the watch's
    /// write, which waits for the first: a deadlock).
    policy_version: std::sync::atomic::AtomicU64,
}

impl Mirror {
    /// A copy loaded from `kvs` (as read at `revision`); publishes to a new bus from its head.
    /// A copy that starts as `state` (loaded at `state.revision`).
    pub fn load(prefix: Vec<u8>, state: State, event_buffer: usize) -> Result<Self> {
        let revision = state.revision;
        let bus = Arc::new(EventBus::new(event_buffer, state.head()?));
        let (applied, _) = watch::channel(revision);
        let policy_version = std::sync::atomic::AtomicU64::new(state.policy_version);
        Ok(Self {
            prefix,
            state: RwLock::new(state),
            applied,
            bus,
            policy_version,
        })
    }

    /// Changes whenever a tenant policy in the copy changes.
    pub fn policy_version(&self) -> u64 {
        self.policy_version
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn bus(&self) -> Arc<EventBus> {
        self.bus.clone()
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn revision(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Applies the changes of one watch message, then publishes the events they added, in order.
    pub fn apply(&self, events: &[mvccpb::Event], revision: i64) -> Result<()> {
        let mut added = Vec::new();
        let head = {
            let mut state = self.write();
            let mut top = state.revision;
            for e in events {
                let Some(kv) = &e.kv else { continue };
                if kv.mod_revision <= state.revision {
                    continue; // seen already (a resumed watch repeats nothing, but be sure)
                }
                let key = kv
                    .key
                    .strip_prefix(self.prefix.as_slice())
                    .unwrap_or(&kv.key);
                let value = (e.r#type == mvccpb::event::EventType::Put as i32)
                    .then_some(kv.value.as_slice());
                added.extend(state.apply(key, value, kv.mod_revision)?);
                top = top.max(kv.mod_revision);
            }
            state.revision = top.max(revision);
            added.sort_unstable();
            let added = added
                .iter()
                .filter_map(|seq| state.events_in(*seq..=*seq).next())
                .collect::<Result<Vec<Event>>>()?;
            (added, state.head()?)
        };
        self.publish(head.0, head.1);
        Ok(())
    }

    /// Replaces the copy with one loaded afresh (after the watch fell behind etcd's compaction).
    pub fn replace(&self, mut fresh: State) -> Result<()> {
        fresh.policy_version = self.read().policy_version + 1;
        let published = self.bus.durable_head();
        let added = fresh
            .events_in(published + 1..)
            .collect::<Result<Vec<Event>>>()?;
        let head = fresh.head()?;
        *self.write() = fresh;
        self.publish(added, head);
        Ok(())
    }

    fn publish(&self, mut added: Vec<Event>, head: u64) {
        added.sort_by_key(|e| e.sequence);
        self.bus.publish(added, head);
        let (revision, policy_version) = {
            let state = self.read();
            (state.revision, state.policy_version)
        };
        self.policy_version
            .store(policy_version, std::sync::atomic::Ordering::Release);
        self.applied.send_if_modified(|r| {
            let raised = revision > *r;
            *r = (*r).max(revision);
            raised
        });
    }

    /// Waits until the copy has applied `revision`, at most `timeout`. False on timeout.
    pub async fn caught_up(&self, revision: i64, timeout: std::time::Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// A planner's view of the copy that notes the revision of each key read.
/// Uses of sessions queued but not written yet are applied to what it reads, so a plan sees
/// the recency that validations already promised (the limit's eviction order, say).
///
/// What a commit must compare is less than what a planner read: a user's set of sessions is
/// compared by its guard, which every change of membership rewrites, and a member by its own key
/// only if the plan writes it (a write must not overwrite a change it did not see). A member the
/// plan only counted or ranked needs no compare: its membership is the guard's, and a change to
/// its contents meanwhile (a use, a rotation) cannot change what the rules decided (a use only
/// makes it more recent than the member the plan evicted, which is compared). So a user's
/// hundredth login costs a handful of compares, not one per session.
pub struct Recording<'a> {
    pub state: &'a State,
    /// Keys to compare, with the revision the copy had.
    reads: RefCell<BTreeMap<Vec<u8>, i64>>,
    /// Sessions read as members of a user's set: compared only if written.
    members: RefCell<BTreeMap<Vec<u8>, i64>>,
    pending: &'a dyn Pending,
}

/// What a replica knows that its copy does not hold yet.
pub trait Pending: Sync {
    /// When the session was last used, if that is not written yet.
    fn touched(&self, id: &SessionId) -> Option<Timestamp>;
    /// The tombstone of a session revoked by deleting its record while etcd was full, until the
    /// tombstone is written.
    fn unlogged(&self, id: &SessionId) -> Option<Session>;
}

impl<'a> Recording<'a> {
    pub fn new(state: &'a State, pending: &'a dyn Pending) -> Self {
        Self {
            state,
            reads: RefCell::new(BTreeMap::new()),
            members: RefCell::new(BTreeMap::new()),
            pending,
        }
    }

    /// Every key the planner looked at, compared or not: what a group member must not share
    /// with another's writes.
    pub fn looked_at(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        let reads: Vec<Vec<u8>> = self.reads.borrow().keys().cloned().collect();
        let members: Vec<Vec<u8>> = self.members.borrow().keys().cloned().collect();
        reads.into_iter().chain(members)
    }

    /// What a commit of `plan` must compare (see the type's doc): the keys read, and the members
    /// of a set that the plan writes.
    pub fn compared(&self, plan: &Plan) -> BTreeMap<Vec<u8>, i64> {
        let mut out = self.reads.borrow().clone();
        let members = self.members.borrow();
        for (old, new) in &plan.sessions {
            if let Some(s) = old.as_ref().or(new.as_ref()) {
                let key = keys::session(&s.id).to_vec();
                if let Some(revision) = members.get(&key) {
                    out.entry(key).or_insert(*revision);
                }
            }
        }
        out
    }

    fn with_touch(&self, mut s: Session) -> Session {
        if s.is_active() {
            if let Some(at) = self.pending.touched(&s.id) {
                s.last_seen_at = s.last_seen_at.max(at);
            }
        }
        s
    }

    fn note(&self, key: &[u8]) {
        let revision = self.state.revision_of(key);
        self.reads.borrow_mut().insert(key.to_vec(), revision);
    }
}

impl View for Recording<'_> {
    fn session(&self, id: &SessionId) -> Result<Option<Session>> {
        self.note(&keys::session(id));
        Ok(match self.state.session(id)? {
            Some(s) => Some(self.with_touch(s)),
            None => self.pending.unlogged(id),
        })
    }

    fn user_sessions(&self, tenant: &str, user: &str) -> Result<Vec<Session>> {
        // The guard changes with the set; each member's own key with the member, compared only
        // if the plan writes it (see the type's doc).
        self.note(&keys::per_user(keys::GUARD, tenant, user));
        let sessions = self.state.user_sessions(tenant, user)?;
        let mut members = self.members.borrow_mut();
        for s in &sessions {
            let key = keys::session(&s.id);
            members.insert(key.to_vec(), self.state.revision_of(&key));
        }
        drop(members);
        Ok(sessions.into_iter().map(|s| self.with_touch(s)).collect())
    }

    fn last_seen(&self, tenant: &str, user: &str) -> Result<Option<LastSeen>> {
        let key = keys::per_user(keys::LAST_SEEN, tenant, user);
        self.note(&key);
        self.state
            .other
            .get(&key)
            .map(|v| records::decode_last_seen(&v.value))
            .transpose()
    }

    fn logins(&self, tenant: &str, user: &str) -> Result<Vec<Login>> {
        let key = keys::per_user(keys::LOGINS, tenant, user);
        self.note(&key);
        self.state
            .other
            .get(&key)
            .map(|v| records::decode_logins(&v.value))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    fn creations(&self, tenant: &str, user: &str) -> Result<Vec<Timestamp>> {
        let key = keys::per_user(keys::CREATIONS, tenant, user);
        self.note(&key);
        Ok(self
            .state
            .other
            .get(&key)
            .map(|v| records::decode_creations(&v.value))
            .unwrap_or_default())
    }
}
