//! The rules of every session write, as planners: each reads through a [`View`] (a consistent,
//! read-only view of the store as it is before the write) and records what to change in a
//! [`Plan`]: sessions before and after, per-user records, and the events, numbered after the log's
//! head. A backend commits a plan atomically; it decides nothing. So the rules (the limit and its
//! eviction, the login quota, impossible travel, tombstones, what a revoke targets, expiry,
//! rotation, enforcement of a tightened policy) are written once, whatever the backend.
//!
//! A plan is committed even when its planner returns a refusal: a create refused at the limit
//! still ends the user's sessions it found past a deadline, and impossible travel with REVOKE
//! still ends the user's sessions. Only a storage error discards it.

use std::{collections::HashSet, sync::Arc, time::Duration};

use crate::{
    clock::Timestamp,
    error::{Error, Result},
    model::{
        binding::{Challenge, MAX_USED_CHALLENGES},
        event::{Event, EventKind},
        flag::{push_flag, Drift, Flag, TokenReuse},
        login::{self, remember, Login, Novelty},
        policy::{
            DriftAction, LimitAction, NewDeviceAction, Policy, TokenReuseAction, TravelAction,
        },
        session::{
            sessions_to_evict, Ending, Location, ReplacedToken, RevokeReason, Session,
            SessionState, Standing, MAX_REPLACED,
        },
        travel::{impossible_travel, LastSeen, TravelFlag, TravelRules},
    },
    token::{SessionId, TokenHash},
};

/// A rotation asked for: `current` must be the session's token hash now; `replacement` takes its
/// place. At a privilege change (a login, say) the replaced token dies at once and is not kept:
/// a token planted before the login must never count as the logged-in session, not even in the
/// grace period, and a request still carrying it is refused without being taken for theft.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub current: TokenHash,
    pub replacement: TokenHash,
    pub privilege_change: bool,
}

/// The tenant's current policy, by tenant id, for writes that judge sessions of several tenants
/// (the sweep): stored deadlines may predate a tightened policy.
pub type PolicyOf = Arc<dyn Fn(&str) -> Arc<Policy> + Send + Sync>;

/// The tenant policy's rules a create must follow, atomically with the create.
#[derive(Debug, Clone)]
pub struct CreateRules {
    /// The tenant's policy in force: the user's sessions are judged by it, not by the deadlines
    /// they were stored with, when counting them against the limit.
    pub policy: Arc<Policy>,
    pub max_sessions_per_user: usize,
    pub limit_action: LimitAction,
    /// 0: no quota.
    pub max_creations_per_day: u32,
    pub travel: TravelRules,
    /// How far back a login is compared with the user's earlier ones (and they are kept).
    pub login_window: Duration,
    pub new_device_action: NewDeviceAction,
}

/// Which sessions a revoke ends.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// These sessions; every id must exist (in `tenant`, if given) or nothing is revoked.
    Sessions {
        ids: Vec<SessionId>,
        tenant: Option<String>,
    },
    /// Those of these sessions that still exist (for bulk work racing with the sweeper).
    AnyOf(Vec<SessionId>),
    /// Every active session of a user, except one if given.
    User {
        tenant_id: String,
        user_id: String,
        except: Option<SessionId>,
    },
}

/// What a create did.
#[derive(Debug, Clone)]
pub struct CreateOutcome {
    /// Sessions revoked to stay under the limit.
    pub evicted: Vec<SessionId>,
    /// Sequence of the `Created` event.
    pub sequence: u64,
    /// What was noticed at this login (impossible travel with policy action FLAG, a new device
    /// or place with `new_device_action` FLAG).
    pub flags: Vec<Flag>,
    /// Whether the login came from a new device or place.
    pub novelty: Novelty,
}

/// A check of a live session that may need a write: the rules of hijacking defences.
#[derive(Debug, Clone)]
pub enum Defence {
    /// `presented` was offered as the session's token and is not its current one: if it is a
    /// token that rotation replaced, presented after the grace period, the policy's reuse action
    /// applies.
    Reuse { presented: TokenHash },
    /// The session was presented from another platform or country than it was created from:
    /// the policy's drift action applies, once per kind of drift.
    Drift(Drift),
    /// A refresh whose proof, signed by the session's device key, answered `challenge` (made
    /// for this session): unless it expired or was used, it is used up now, and `replacement`
    /// becomes the session's token (a rotation).
    Refresh {
        challenge: Challenge,
        replacement: TokenHash,
    },
}

/// What a defence left.
#[derive(Debug, Clone)]
pub struct Defended {
    /// The session as the write left it (ended, if the defence revoked it).
    pub session: Session,
    /// Sequence of the last event written, or the head if none was.
    pub sequence: u64,
}

/// What a revoke did.
#[derive(Debug, Clone)]
pub struct RevokeOutcome {
    /// Sessions this call ended (in the order asked, or by creation time for a user).
    pub revoked: Vec<SessionId>,
    /// Every targeted session as this call left it (ended, or as it already was), in the order
    /// asked. A reply can show it even when no tombstone is kept.
    pub sessions: Vec<Session>,
    /// Sequence of the last event written, or the head if none was.
    pub sequence: u64,
}

/// What a rotation did.
#[derive(Debug, Clone)]
pub struct RotateOutcome {
    pub session: Session,
    pub sequence: u64,
}

/// What a planner reads: the store as it is before the write.
pub trait View {
    /// A session by id, live or tombstone.
    fn session(&self, id: &SessionId) -> Result<Option<Session>>;
    /// A user's active sessions, by creation time.
    fn user_sessions(&self, tenant: &str, user: &str) -> Result<Vec<Session>>;
    /// A user's last known place.
    fn last_seen(&self, tenant: &str, user: &str) -> Result<Option<LastSeen>>;
    /// When the user created sessions lately (the login quota's record).
    fn creations(&self, tenant: &str, user: &str) -> Result<Vec<Timestamp>>;
    /// The user's recent logins (new-device signals).
    fn logins(&self, tenant: &str, user: &str) -> Result<Vec<Login>>;
}

/// What one write changes, to be committed atomically.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Session records as read and as they must be written (`None`: deleted). A session may
    /// appear more than once; writes apply in order.
    pub sessions: Vec<(Option<Session>, Option<Session>)>,
    /// Users' last known places to store.
    pub last_seen: Vec<(String, String, LastSeen)>,
    /// Login-quota records to store.
    pub creations: Vec<(String, String, Vec<Timestamp>)>,
    /// Users' recent logins to store.
    pub logins: Vec<(String, String, Vec<Login>)>,
    /// The events, numbered from the head the plan started at.
    pub events: Vec<Event>,
    /// The sequence of the last event (the starting head if none).
    pub head: u64,
    /// Sessions this plan ended: reads see the store as before the write, so this keeps a
    /// session from being ended twice (and getting two events) by one plan.
    ended: HashSet<SessionId>,
    tombstone_retention: Duration,
}

impl Plan {
    /// An empty plan whose events follow `head`; ended sessions keep tombstones this long.
    pub fn new(head: u64, tombstone_retention: Duration) -> Self {
        Self {
            sessions: Vec::new(),
            last_seen: Vec::new(),
            creations: Vec::new(),
            logins: Vec::new(),
            events: Vec::new(),
            head,
            ended: HashSet::new(),
            tombstone_retention,
        }
    }

    /// The same changes with their events numbered anew after `head`: for a plan committed in
    /// part, without its events (the etcd backend's revocations while its store is full, whose
    /// events are written when space returns).
    pub fn renumbered(mut self, head: u64) -> Self {
        self.head = head;
        for e in &mut self.events {
            self.head += 1;
            e.sequence = self.head;
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
            && self.last_seen.is_empty()
            && self.creations.is_empty()
            && self.logins.is_empty()
            && self.events.is_empty()
    }

    fn put(&mut self, old: Option<&Session>, new: Option<&Session>) {
        self.sessions.push((old.cloned(), new.cloned()));
    }

    fn emit(&mut self, s: &Session, now: Timestamp, kind: EventKind) -> u64 {
        self.head += 1;
        self.events.push(Event {
            sequence: self.head,
            occurred_at: now,
            tenant_id: s.tenant_id.clone(),
            user_id: s.user_id.clone(),
            session_id: s.id,
            kind,
        });
        self.head
    }
}

/// Runs the rules of one write against a view, into a plan.
pub struct Planner<'v, V: ?Sized> {
    view: &'v V,
    pub plan: Plan,
}

impl<'v, V: View + ?Sized> Planner<'v, V> {
    pub fn new(view: &'v V, plan: Plan) -> Self {
        Self { view, plan }
    }

    /// Active session `s` as `policy` (its tenant's, in force now) sees it: a tightened policy
    /// applies to open sessions. Stored that way if it changed, so the deadline index follows
    /// the deadlines in force (later writes in this command start from the returned session).
    fn tightened(&mut self, s: Session, policy: &Policy) -> Session {
        let mut tightened = s.clone();
        tightened.tighten(policy);
        if tightened != s {
            self.plan.put(Some(&s), Some(&tightened));
        }
        tightened
    }

    /// Writes `ended` as the tombstone of `s`, or drops the session if tombstones are not kept.
    fn bury(&mut self, s: &Session, ended: &mut Session, now: Timestamp) {
        if self.plan.tombstone_retention.is_zero() {
            self.plan.put(Some(s), None);
        } else {
            ended.purge_at = Some(now.saturating_add(self.plan.tombstone_retention));
            self.plan.put(Some(s), Some(ended));
        }
    }

    /// Ends active session `s` in `state`, with its event; returns the session as ended.
    fn finish(
        &mut self,
        s: &Session,
        state: SessionState,
        now: Timestamp,
        kind: EventKind,
    ) -> Session {
        self.plan.ended.insert(s.id);
        let mut ended = s.clone();
        ended.state = state;
        // An ended session has no token to reuse or renew; its tombstone need not remember any.
        ended.replaced.clear();
        if let Some(b) = ended.binding.as_mut() {
            b.used.clear();
        }
        self.bury(s, &mut ended, now);
        self.plan.emit(s, now, kind);
        ended
    }

    /// Ends an active session that passed a deadline, the way that deadline ends it.
    fn end(&mut self, s: &Session, ending: Ending, now: Timestamp) -> Session {
        let kind = match ending {
            Ending::Expired(kind) => EventKind::Expired { kind },
            Ending::TooOld => EventKind::Revoked {
                reason: RevokeReason::Policy,
            },
        };
        self.finish(s, s.ended_by(ending, now), now, kind)
    }

    fn end_by_revoke(&mut self, s: &Session, reason: RevokeReason, now: Timestamp) -> Session {
        let state = SessionState::Revoked { at: now, reason };
        self.finish(s, state, now, EventKind::Revoked { reason })
    }

    /// Revokes `s` if it is live, ends it the deadline's way if it is past one. Returns whether
    /// this call revoked it, and the session as this call left it.
    fn revoke_one(&mut self, s: &Session, reason: RevokeReason, now: Timestamp) -> (bool, Session) {
        if !s.is_active() || self.plan.ended.contains(&s.id) {
            return (false, s.clone());
        }
        match s.ending_at(now) {
            Some(ending) => (false, self.end(s, ending, now)),
            None => (true, self.end_by_revoke(s, reason, now)),
        }
    }

    /// A new session under `rules`: the login quota, the limit (ending the user's sessions past
    /// a deadline, then evicting the least recently used or refusing), impossible travel.
    pub fn create(&mut self, mut session: Session, rules: CreateRules) -> Result<CreateOutcome> {
        let now = session.created_at;
        if self.view.session(&session.id)?.is_some() {
            // 128 random bits: this means a broken generator, never a real collision.
            return Err(Error::Storage("session id collision".into()));
        }
        let (tenant, user) = (session.tenant_id.clone(), session.user_id.clone());

        // The login quota: creations in the last 24 hours.
        let mut creations = Vec::new();
        if rules.max_creations_per_day > 0 {
            let day_ago = now.saturating_sub(std::time::Duration::from_secs(86_400));
            creations = self.view.creations(&tenant, &user)?;
            creations.retain(|t| *t > day_ago);
            if creations.len() >= rules.max_creations_per_day as usize {
                return Err(Error::ResourceExhausted(format!(
                    "max_creations_per_day: this user created {} sessions in the last 24 hours",
                    creations.len()
                )));
            }
        }

        // The per-user limit. Sessions past a deadline end here, whatever happens next.
        let mut live = Vec::new();
        for s in self.view.user_sessions(&tenant, &user)? {
            let s = self.tightened(s, &rules.policy);
            match s.ending_at(now) {
                Some(ending) => {
                    self.end(&s, ending, now);
                }
                None => live.push(s),
            }
        }
        if live.len() >= rules.max_sessions_per_user && rules.limit_action == LimitAction::Reject {
            return Err(Error::ResourceExhausted(format!(
                "max_sessions_per_user: this user already has {} live sessions",
                live.len()
            )));
        }

        // Impossible travel.
        let here = session
            .device
            .location
            .clone()
            .filter(|l| l.coordinates.is_some());
        let mut flag = None;
        if let (Some(here), true) = (&here, rules.travel.action != TravelAction::Ignore) {
            let previous = self.view.last_seen(&tenant, &user)?;
            if let Some(f) = previous
                .as_ref()
                .and_then(|p| impossible_travel(p, here, now, &rules.travel))
            {
                match rules.travel.action {
                    TravelAction::Reject => return Err(travel_refusal(&f)),
                    TravelAction::Revoke => {
                        self.revoke_user_for_travel(&tenant, &user, now)?;
                        return Err(travel_refusal(&f));
                    }
                    TravelAction::Flag | TravelAction::Ignore => flag = Some(f),
                }
            }
        }

        // Accepted: record it all.
        if rules.max_creations_per_day > 0 {
            creations.push(now);
            self.plan
                .creations
                .push((tenant.clone(), user.clone(), creations));
        }
        if let Some(here) = here {
            self.set_last_seen(&tenant, &user, here, now, session.id);
        }
        let evicted = sessions_to_evict(&live, rules.max_sessions_per_user);
        for s in live.iter().filter(|s| evicted.contains(&s.id)) {
            self.end_by_revoke(s, RevokeReason::LimitEviction, now);
        }
        // New device, new place: compared with the user's recent logins, then remembered.
        let login = Login::from_device(&session.device, now);
        let mut novelty = Novelty::default();
        if login.is_comparable() {
            let logins = self.view.logins(&tenant, &user)?;
            novelty = login::novelty(&login, &logins, rules.login_window);
            self.plan.logins.push((
                tenant.clone(),
                user.clone(),
                remember(logins, login, rules.login_window),
            ));
        }
        session.new_device = novelty.new_device;
        session.new_place = novelty.new_place;
        let mut flags: Vec<Flag> = flag.into_iter().map(Flag::Travel).collect();
        if rules.new_device_action == NewDeviceAction::Flag {
            if novelty.new_device {
                flags.push(Flag::NewDevice { flagged_at: now });
            }
            if novelty.new_place {
                flags.push(Flag::NewPlace { flagged_at: now });
            }
        }
        for f in &flags {
            push_flag(&mut session.flags, f.clone());
        }
        self.plan.put(None, Some(&session));
        let sequence = self.plan.emit(
            &session,
            now,
            EventKind::Created {
                device: session.device.clone(),
                remember_me: session.remember_me,
                evicted: evicted.clone(),
                new_device: session.new_device,
                new_place: session.new_place,
            },
        );
        for f in &flags {
            self.plan
                .emit(&session, now, EventKind::Flagged { flag: f.clone() });
        }
        Ok(CreateOutcome {
            evicted,
            sequence,
            flags,
            novelty,
        })
    }

    fn set_last_seen(
        &mut self,
        tenant: &str,
        user: &str,
        location: Location,
        at: Timestamp,
        session_id: SessionId,
    ) {
        let seen = LastSeen {
            location,
            at,
            session_id,
        };
        self.plan
            .last_seen
            .push((tenant.to_string(), user.to_string(), seen));
    }

    /// REVOKE: one of the two places is not the user, and nobody can tell which, so every live
    /// session of the user ends (reason suspicious activity).
    fn revoke_user_for_travel(&mut self, tenant: &str, user: &str, now: Timestamp) -> Result<()> {
        for s in self.view.user_sessions(tenant, user)? {
            self.revoke_one(&s, RevokeReason::SuspiciousActivity, now);
        }
        Ok(())
    }

    /// Live session `id` seen at `location`: records the place, flags or revokes on impossible
    /// travel.
    pub fn observe(
        &mut self,
        id: SessionId,
        location: Location,
        now: Timestamp,
        rules: TravelRules,
    ) -> Result<Session> {
        let s = match self.view.session(&id)? {
            Some(s) if s.is_live_at(now) => s,
            _ => return Err(Error::SessionNotValid),
        };
        let previous = self.view.last_seen(&s.tenant_id, &s.user_id)?;
        let flag = previous
            .as_ref()
            .and_then(|p| impossible_travel(p, &location, now, &rules));
        let Some(flag) = flag else {
            self.set_last_seen(&s.tenant_id, &s.user_id, location, now, id);
            return Ok(s);
        };
        if rules.action == TravelAction::Revoke {
            self.revoke_user_for_travel(&s.tenant_id, &s.user_id, now)?;
            return Err(Error::SessionNotValid);
        }
        // FLAG, and REJECT (an open session cannot be refused, only flagged).
        let flag = Flag::Travel(flag);
        let mut flagged = s.clone();
        push_flag(&mut flagged.flags, flag.clone());
        self.plan.put(Some(&s), Some(&flagged));
        self.plan.emit(&s, now, EventKind::Flagged { flag });
        self.set_last_seen(&s.tenant_id, &s.user_id, location, now, id);
        Ok(flagged)
    }

    /// Stores a tightened policy on these sessions and ends those already past it.
    pub fn enforce(
        &mut self,
        ids: Vec<SessionId>,
        policy: &Policy,
        now: Timestamp,
    ) -> Result<usize> {
        let mut changed = 0;
        let mut seen = HashSet::new();
        for id in ids.into_iter().filter(|id| seen.insert(*id)) {
            let Some(s) = self.view.session(&id)? else {
                continue;
            };
            if !s.is_active() {
                continue;
            }
            let mut tightened = s.clone();
            tightened.tighten(policy);
            if tightened == s && tightened.ending_at(now).is_none() {
                continue;
            }
            self.plan.put(Some(&s), Some(&tightened));
            if let Some(ending) = tightened.ending_at(now) {
                self.end(&tightened, ending, now);
            }
            changed += 1;
        }
        Ok(changed)
    }

    /// Session `id` if it is live under `policy` (its tenant's, in force now); one found past a
    /// deadline is ended here. `SessionNotValid` otherwise.
    fn live(&mut self, id: SessionId, policy: &Policy, now: Timestamp) -> Result<Session> {
        let s = match self.view.session(&id)? {
            Some(s) if s.is_active() => s,
            _ => return Err(Error::SessionNotValid),
        };
        let s = self.tightened(s, policy);
        if let Some(ending) = s.ending_at(now) {
            self.end(&s, ending, now);
            return Err(Error::SessionNotValid);
        }
        Ok(s)
    }

    /// Replaces a live session's token hash if `rotation.current` is its hash now. Any other
    /// token is refused, changing nothing: a replaced one, even within the grace period, so one
    /// token never forks into two live ones (reuse of one is the caller's to act on, after it
    /// answered, so that the answer's timing says nothing).
    pub fn rotate(
        &mut self,
        id: SessionId,
        rotation: Rotation,
        policy: &Policy,
        now: Timestamp,
    ) -> Result<RotateOutcome> {
        let s = self.live(id, policy, now)?;
        if !s.token_hash.matches(&rotation.current) {
            return Err(Error::SessionNotValid);
        }
        if s.bound_token_expired(now) {
            // Expired: dead like any other, and saying more would tell its holder it was current.
            return Err(Error::SessionNotValid);
        }
        if s.binding.is_some() {
            // Its tokens are renewed only against a proof from the device's key; a rotation
            // would hand a thief holding a bound token a fresh one.
            return Err(Error::FailedPrecondition(
                "token: the session is device-bound; renew its token with RefreshBoundSession"
                    .into(),
            ));
        }
        let mut rotated = s.clone();
        rotated.token_hash = rotation.replacement;
        rotated.last_seen_at = now.max(s.last_seen_at);
        rotated.rotation_count = s.rotation_count.saturating_add(1);
        if !rotation.privilege_change {
            push_replaced(&mut rotated, rotation.current, None, now);
        }
        self.plan.put(Some(&s), Some(&rotated));
        let sequence = self.plan.emit(&s, now, EventKind::Rotated);
        Ok(RotateOutcome {
            session: rotated,
            sequence,
        })
    }

    /// If `presented` is a token rotation replaced from live session `s`, and its grace period
    /// is over, applies the policy's reuse action: the thief or the user holds a stale copy and
    /// nobody can tell which, so REVOKE ends the session (a `flagged` event with the details,
    /// then `revoked`, reason token reuse) and FLAG flags it once per reused token.
    /// Returns the session as this left it.
    fn reuse(
        &mut self,
        s: &Session,
        presented: &TokenHash,
        policy: &Policy,
        now: Timestamp,
    ) -> Session {
        let Standing::Reused(replaced) = s.standing(presented, policy.rotation_grace_period, now)
        else {
            return s.clone();
        };
        if policy.token_reuse_action == TokenReuseAction::Ignore {
            return s.clone();
        }
        let already = s.flagged_for_reuse_of(replaced.rotation);
        if already && policy.token_reuse_action == TokenReuseAction::Flag {
            return s.clone();
        }
        let flag = Flag::TokenReuse(TokenReuse {
            flagged_at: now,
            rotation: replaced.rotation,
            replaced_at: replaced.replaced_at,
        });
        let mut flagged = s.clone();
        push_flag(&mut flagged.flags, flag.clone());
        self.plan.put(Some(s), Some(&flagged));
        self.plan.emit(s, now, EventKind::Flagged { flag });
        if policy.token_reuse_action == TokenReuseAction::Revoke {
            return self.end_by_revoke(&flagged, RevokeReason::TokenReuse, now);
        }
        flagged
    }

    /// Flags (FLAG, once per kind) or revokes (REVOKE, reason suspicious activity, after the
    /// flag's event) live session `s` for `drift`. Returns the session as this left it.
    fn drift(&mut self, s: &Session, drift: Drift, action: DriftAction, now: Timestamp) -> Session {
        let kind = drift.kind;
        let already = s
            .flags
            .iter()
            .any(|f| matches!(f, Flag::Drift(d) if d.kind == kind));
        if action == DriftAction::None || (already && action == DriftAction::Flag) {
            return s.clone();
        }
        let flag = Flag::Drift(drift);
        let mut flagged = s.clone();
        push_flag(&mut flagged.flags, flag.clone());
        self.plan.put(Some(s), Some(&flagged));
        self.plan.emit(s, now, EventKind::Flagged { flag });
        if action == DriftAction::Revoke {
            return self.end_by_revoke(&flagged, RevokeReason::SuspiciousActivity, now);
        }
        flagged
    }

    /// Consumes `challenge` (opened from its seal by the caller, so made for this session) and
    /// rotates bound session `s`'s token to `replacement`; the new token lives
    /// `bound_token_ttl` from now, and the session's refresh generation (its rotation count)
    /// moves on, so no challenge made before answers again. `SessionNotValid`, changing
    /// nothing, if the challenge expired or was made for another generation (or, without one,
    /// was used already).
    fn refresh(
        &mut self,
        s: &Session,
        challenge: Challenge,
        replacement: TokenHash,
        policy: &Policy,
        now: Timestamp,
    ) -> Result<Session> {
        let binding = s.binding.as_ref().ok_or(Error::SessionNotValid)?;
        let mut used: Vec<Challenge> = binding
            .used
            .iter()
            .filter(|c| c.expires_at > now)
            .copied()
            .collect();
        if challenge.expires_at <= now {
            return Err(Error::SessionNotValid);
        }
        match challenge.generation {
            Some(generation) if generation != s.rotation_count => {
                return Err(Error::SessionNotValid)
            }
            Some(_) => {}
            // Sealed by an earlier version: single use by the list, until the last expires.
            None => {
                if used.iter().any(|c| c.nonce == challenge.nonce)
                    || used.len() >= MAX_USED_CHALLENGES
                {
                    return Err(Error::SessionNotValid);
                }
                used.push(challenge);
            }
        }
        let mut refreshed = s.clone();
        refreshed.token_hash = replacement;
        refreshed.last_seen_at = now.max(s.last_seen_at);
        refreshed.rotation_count = s.rotation_count.saturating_add(1);
        push_replaced(
            &mut refreshed,
            s.token_hash,
            s.bound_token_expires_at(),
            now,
        );
        if let Some(b) = refreshed.binding.as_mut() {
            b.used = used;
            b.token_issued_at = now;
            b.token_expires_at = now.saturating_add(policy.bound_token_ttl);
        }
        self.plan.put(Some(s), Some(&refreshed));
        self.plan.emit(s, now, EventKind::Rotated);
        Ok(refreshed)
    }

    /// Applies a hijacking defence to live session `id`, judged by `policy` (its tenant's).
    pub fn defend(
        &mut self,
        id: SessionId,
        defence: Defence,
        policy: &Policy,
        now: Timestamp,
    ) -> Result<Defended> {
        let s = self.live(id, policy, now)?;
        let session = match defence {
            Defence::Reuse { presented } => self.reuse(&s, &presented, policy, now),
            Defence::Drift(drift) => self.drift(&s, drift, policy.drift_action, now),
            Defence::Refresh {
                challenge,
                replacement,
            } => self.refresh(&s, challenge, replacement, policy, now)?,
        };
        Ok(Defended {
            session,
            sequence: self.plan.head,
        })
    }

    /// Revokes the target's live sessions; ends the ones found past a deadline the deadline's way.
    pub fn revoke(
        &mut self,
        target: RevokeTarget,
        reason: RevokeReason,
        now: Timestamp,
    ) -> Result<RevokeOutcome> {
        let sessions = match target {
            RevokeTarget::Sessions { ids, tenant } => {
                let mut seen = HashSet::new();
                let mut sessions = Vec::with_capacity(ids.len());
                for id in ids.into_iter().filter(|id| seen.insert(*id)) {
                    // Another tenant's session does not exist for a tenant-bound caller.
                    let s = self
                        .view
                        .session(&id)?
                        .filter(|s| tenant.as_ref().is_none_or(|t| *t == s.tenant_id))
                        .ok_or(Error::SessionNotFound(id))?;
                    sessions.push(s);
                }
                sessions
            }
            RevokeTarget::AnyOf(ids) => {
                let mut seen = HashSet::new();
                let mut sessions = Vec::with_capacity(ids.len());
                for id in ids.into_iter().filter(|id| seen.insert(*id)) {
                    sessions.extend(self.view.session(&id)?);
                }
                sessions
            }
            RevokeTarget::User {
                tenant_id,
                user_id,
                except,
            } => self
                .view
                .user_sessions(&tenant_id, &user_id)?
                .into_iter()
                .filter(|s| Some(s.id) != except)
                .collect(),
        };
        let mut revoked = Vec::new();
        let mut after = Vec::with_capacity(sessions.len());
        for s in &sessions {
            let (ended_here, session) = self.revoke_one(s, reason, now);
            if ended_here {
                revoked.push(s.id);
            }
            after.push(session);
        }
        Ok(RevokeOutcome {
            revoked,
            sessions: after,
            sequence: self.plan.head,
        })
    }

    /// Ends the listed sessions past a deadline, purges expired tombstones, re-files the rest.
    pub fn sweep(
        &mut self,
        ids: Vec<SessionId>,
        policy_of: &PolicyOf,
        now: Timestamp,
    ) -> Result<usize> {
        let mut expired = 0;
        let mut seen = HashSet::new();
        for id in ids.into_iter().filter(|id| seen.insert(*id)) {
            let Some(s) = self.view.session(&id)? else {
                continue;
            };
            let s = if s.is_active() {
                let policy = policy_of(&s.tenant_id);
                self.tightened(s, &policy)
            } else {
                s
            };
            match (s.is_active(), s.ending_at(now)) {
                (true, Some(ending)) => {
                    self.end(&s, ending, now);
                    expired += 1;
                }
                // Active and live: it was used since it was filed; the put re-files it.
                (true, None) => {
                    if s.next_deadline() <= now {
                        self.plan.put(Some(&s), Some(&s));
                    }
                }
                (false, _) if now >= s.purge_at() => self.plan.put(Some(&s), None),
                (false, _) => {}
            }
        }
        Ok(expired)
    }

    /// Records a use of a live session. A validate judged the session live when it used it, so
    /// the use is judged here against itself, not against the stored last use: a store keeps only
    /// a session's latest queued touch, and a writer that lags can meet one more than an idle
    /// timeout after the stored use (the uses between were merged away), for a session that was
    /// never idle. Ended sessions (revoked, or swept) stay ended, and a use past the absolute
    /// deadline or the maximum age is not recorded.
    pub fn touch(&mut self, id: SessionId, now: Timestamp) -> Result<()> {
        if let Some(s) = self.view.session(&id)? {
            let mut touched = s.clone();
            touched.last_seen_at = now;
            if touched.is_live_at(now) && now > s.last_seen_at {
                self.plan.put(Some(&s), Some(&touched));
            }
        }
        Ok(())
    }
}

/// Remembers `hash`, just replaced by rotation number `s.rotation_count`, for reuse detection;
/// a bound token with its own end, `expires_at`.
fn push_replaced(s: &mut Session, hash: TokenHash, expires_at: Option<Timestamp>, now: Timestamp) {
    s.replaced.push(ReplacedToken {
        hash,
        rotation: s.rotation_count,
        replaced_at: now,
        expires_at,
    });
    let excess = s.replaced.len().saturating_sub(MAX_REPLACED);
    s.replaced.drain(..excess);
}

fn travel_refusal(flag: &TravelFlag) -> Error {
    Error::PermissionDenied(format!(
        "impossible travel: {:.0} km from the user's last place in {}, {:.0} km/h",
        flag.distance_km,
        humantime::format_duration(std::time::Duration::from_secs(
            flag.flagged_at.since(flag.from_seen_at).as_secs()
        )),
        flag.speed_kmh.min(1e9),
    ))
}
