//! The domain: creating, validating, rotating, listing and revoking sessions under each tenant's
//! [`Policy`] (timeouts, limits, quota, impossible travel, cookie advice). Knows nothing of gRPC or
//! sled: it talks to a [`SessionStore`] and reads time from a [`Clock`].

pub mod policies;
pub mod subscription;
pub mod sweeper;

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

pub use sweeper::{run_sweeper, Retention, UserStatePass};

use self::policies::Policies;
use crate::{
    clock::{Clock, Timestamp},
    error::{Error, Result},
    model::{
        binding::{
            iat_is_fresh, verify_proof, Binding, BindingKey, Challenge, ChallengeSeal,
            CHALLENGE_TTL,
        },
        flag::{Drift, DriftKind, Flag},
        platform::{country_drift, platform_drift},
        policy::{CookieAdvice, DriftAction, Policy, TokenReuseAction, TravelAction},
        session::{Device, Location, ReplacedToken, RevokeReason, Session, SessionState, Standing},
        travel::distance_km,
    },
    store::{self, CreateRules, Defence, ListScope, RevokeTarget, Rotation, SessionStore},
    token::{self, SessionId, SessionToken, TokenGenerator, TokenHash},
};

/// Input limits, enforced by the gRPC layer's decoding and documented in the proto.
pub mod limits {
    /// Longest tenant or user id, in bytes.
    pub const MAX_ID_BYTES: usize = 128;
    pub const MAX_ATTRIBUTES: usize = 16;
    pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 64;
    pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 256;
    pub const MAX_USER_AGENT_BYTES: usize = 512;
    pub const MAX_DEVICE_LABEL_BYTES: usize = 128;
    pub const MAX_CITY_BYTES: usize = 128;
    pub const MAX_PAGE_SIZE: usize = 1000;
    pub const DEFAULT_PAGE_SIZE: usize = 100;
    /// Most ids in one RevokeSessions call.
    pub const MAX_REVOKE_IDS: usize = 1000;
    /// Most tokens in one ValidateSessions call (500 tokens fit the 64 KiB request limit).
    pub const MAX_VALIDATE_TOKENS: usize = 500;
}

/// A validated request to start a session.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub tenant_id: String,
    pub user_id: String,
    pub remember_me: bool,
    pub device: Device,
    pub attributes: BTreeMap<String, String>,
    /// The device's public key, for a device-bound session.
    pub binding_key: Option<BindingKey>,
}

/// A started session and the token to hand to the client.
#[derive(Debug)]
pub struct Created {
    pub session: Session,
    pub token: SessionToken,
    pub evicted: Vec<SessionId>,
    pub sequence: u64,
    pub cookie: CookieAdvice,
    /// For a device-bound session, the challenge its first refresh answers.
    pub next_challenge: Option<Challenged>,
}

/// A rotated session and its new token.
#[derive(Debug)]
pub struct Rotated {
    pub session: Session,
    pub token: SessionToken,
    pub sequence: u64,
    pub cookie: CookieAdvice,
}

/// A refreshed device-bound session: its new token, and the challenge for its next refresh.
#[derive(Debug)]
pub struct Refreshed {
    pub rotated: Rotated,
    pub next_challenge: Challenged,
}

/// A sealed challenge as handed to a device, and when it stops being answerable.
#[derive(Debug)]
pub struct Challenged {
    pub challenge: String,
    pub expires_at: Timestamp,
}

/// A validated listing request.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub scope: ListScope,
    pub page_size: usize,
    /// Opaque cursor from the previous page.
    pub cursor: Option<Vec<u8>>,
    pub filter: SessionFilter,
}

/// Narrows a listing or a bulk revocation; every set criterion must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionFilter {
    pub older_than: Option<Duration>,
    pub idle_longer_than: Option<Duration>,
    pub flagged_only: bool,
    pub ip: Option<std::net::IpAddr>,
    pub country: Option<String>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
}

impl SessionFilter {
    /// True if no criterion is set (it would match everything).
    pub fn is_empty(&self) -> bool {
        *self == SessionFilter::default()
    }

    pub fn matches(&self, s: &Session, now: Timestamp) -> bool {
        // At or past the threshold counts, so that "older than 0s" matches every session.
        self.older_than.is_none_or(|d| now.since(s.created_at) >= d)
            && self
                .idle_longer_than
                .is_none_or(|d| now.since(s.last_seen_at) >= d)
            && (!self.flagged_only || !s.flags.is_empty())
            && self.ip.is_none_or(|ip| s.device.ip == Some(ip))
            && self
                .country
                .as_ref()
                .is_none_or(|c| s.device.location.as_ref().is_some_and(|l| l.country == *c))
            && self.created_after.is_none_or(|t| s.created_at >= t)
            && self.created_before.is_none_or(|t| s.created_at < t)
    }
}

/// A validated bulk revocation.
#[derive(Debug, Clone)]
pub struct MatchQuery {
    pub scope: ListScope,
    pub filter: SessionFilter,
    pub reason: RevokeReason,
    pub dry_run: bool,
}

/// What a bulk revocation matched (and revoked, unless a dry run).
#[derive(Debug)]
pub struct Matched {
    pub matched: u64,
    pub sample: Vec<Session>,
    pub sequence: u64,
}

/// A tenant's counts.
#[derive(Debug, Default)]
pub struct Stats {
    pub live_sessions: u64,
    pub distinct_users: u64,
    pub flagged_sessions: u64,
    pub created_last_24h: u64,
    pub revoked_last_24h: Vec<(RevokeReason, u64)>,
    pub expired_last_24h: u64,
    pub new_device_logins_last_24h: u64,
    pub new_place_logins_last_24h: u64,
}

/// A page of live sessions.
#[derive(Debug)]
pub struct Page {
    pub sessions: Vec<Session>,
    pub next: Option<Vec<u8>>,
}

/// The outcome of a revoke.
#[derive(Debug)]
pub struct Revoked {
    pub revoked: Vec<SessionId>,
    /// The targeted sessions as the revoke left them, in the order asked.
    pub sessions: Vec<Session>,
    pub sequence: u64,
}

/// The session authority's operations.
pub struct Sessions<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    tokens: TokenGenerator,
    policies: Arc<Policies<S>>,
    /// Resolution of `last_seen_at` (see `Config::touch_interval`).
    touch_interval: Duration,
    /// How far back a login is compared with the user's earlier ones (`user_state_retention`).
    login_window: Duration,
    /// Seals the challenges of device-bound sessions.
    seal: ChallengeSeal,
    /// Sessions with a defence on its way to the store (`defend_soon`): one at a time each, and
    /// at most `MAX_DEFENCES` in all, however often a replaced token is presented.
    defending: Arc<std::sync::Mutex<HashSet<SessionId>>>,
}

/// Most defences on their way to the store at once. Beyond this a presentation is refused as
/// always but its defence waits for a later one: a flood of replaced tokens (from anywhere:
/// ValidateSessions needs no IP) never queues unbounded work for the writer.
const MAX_DEFENCES: usize = 1024;

/// The default `login_window`: the default `user_state_retention`.
const DEFAULT_LOGIN_WINDOW: Duration = Duration::from_secs(30 * 86_400);

impl<S: SessionStore> Sessions<S> {
    pub fn new(
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        tokens: TokenGenerator,
        policies: Arc<Policies<S>>,
        touch_interval: Duration,
    ) -> Self {
        let seal = ChallengeSeal::new(&store.installation_secret());
        Self {
            store,
            clock,
            tokens,
            policies,
            touch_interval,
            login_window: DEFAULT_LOGIN_WINDOW,
            seal,
            defending: Arc::default(),
        }
    }

    /// Compares logins with the user's logins of this long before them (new device, new
    /// place); the store keeps them as long (see `purge_user_state`).
    pub fn with_login_window(mut self, window: Duration) -> Self {
        self.login_window = window;
        self
    }

    pub fn policies(&self) -> &Arc<Policies<S>> {
        &self.policies
    }

    /// A stored session as its tenant's current policy sees it (a tightened policy applies to
    /// open sessions at once), with a session past a deadline shown as ended.
    fn current(&self, stored: Session, now: Timestamp) -> (Session, Arc<Policy>) {
        let policy = self.policies.for_tenant(&stored.tenant_id);
        if !stored.is_active() {
            return (stored, policy);
        }
        let mut session = stored;
        session.tighten(&policy);
        if let Some(ending) = session.ending_at(now) {
            session.state = session.ended_by(ending, now);
        }
        (session, policy)
    }

    fn cookie_advice(&self, s: &Session, policy: &Policy, now: Timestamp) -> CookieAdvice {
        let ends = s
            .max_age_at
            .map_or(s.absolute_expires_at, |t| t.min(s.absolute_expires_at));
        // A bound session's cookie lasts as long as its token: when it is gone the browser asks
        // for a refresh (DBSC), rather than sending a token the service would refuse.
        let max_age = match s.bound_token_expires_at() {
            Some(token_ends) => Some(token_ends.min(ends).since(now)),
            // Remember me: a persistent cookie that lasts as long as the session can. Otherwise
            // a browser-session cookie, gone when the browser closes.
            None => s.remember_me.then(|| ends.since(now)),
        };
        CookieAdvice {
            name: self.policies.cookie_name(&s.tenant_id, policy),
            max_age,
            secure: policy.cookie_secure,
            http_only: true,
            same_site: policy.cookie_same_site,
        }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Starts a session under the tenant's policy.
    pub async fn create(&self, new: NewSession) -> Result<Created> {
        let now = self.clock.now();
        let policy = self.policies.for_tenant(&new.tenant_id);
        if new.remember_me && !policy.remember_me_allowed {
            return Err(Error::FailedPrecondition(
                "remember_me: this tenant's policy does not allow \"remember me\"".into(),
            ));
        }
        let (idle, absolute) = policy.timeouts(new.remember_me);
        let id = self.tokens.session_id(now);
        let issued = self.tokens.issue(&id);
        let mut session = Session {
            id,
            tenant_id: new.tenant_id,
            user_id: new.user_id,
            token_hash: issued.hash,
            created_at: now,
            last_seen_at: now,
            idle_timeout: idle,
            absolute_expires_at: now.saturating_add(absolute),
            remember_me: new.remember_me,
            device: new.device,
            attributes: new.attributes,
            state: SessionState::Active,
            rotation_count: 0,
            max_age_at: policy.max_session_age.map(|age| now.saturating_add(age)),
            flags: Vec::new(),
            replaced: Vec::new(),
            new_device: false,
            new_place: false,
            binding: new.binding_key.map(|key| Binding {
                key,
                token_issued_at: now,
                token_expires_at: now.saturating_add(policy.bound_token_ttl),
                used: Vec::new(),
            }),
            purge_at: None,
        };
        let rules = CreateRules {
            policy: policy.clone(),
            max_sessions_per_user: usize::try_from(policy.max_sessions_per_user)
                .unwrap_or(usize::MAX),
            limit_action: policy.limit_action,
            max_creations_per_day: policy.max_creations_per_day,
            travel: policy.travel_rules(),
            login_window: self.login_window,
            new_device_action: policy.new_device_action,
        };
        let outcome = self.store.create(session.clone(), rules).await?;
        session.flags.extend(outcome.flags);
        session.new_device = outcome.novelty.new_device;
        session.new_place = outcome.novelty.new_place;
        tracing::info!(
            session_id = %session.id,
            tenant_id = %session.tenant_id,
            evicted = outcome.evicted.len(),
            flagged = !session.flags.is_empty(),
            "session created"
        );
        let cookie = self.cookie_advice(&session, &policy, now);
        let next_challenge = session
            .binding
            .is_some()
            .then(|| self.carried_challenge(&session, now));
        Ok(Created {
            session,
            token: issued.token,
            evicted: outcome.evicted,
            sequence: outcome.sequence,
            cookie,
            next_challenge,
        })
    }

    /// The live session a token belongs to. Every failure is the same `SessionNotValid`.
    /// `device`, the caller's view of the client now, is checked for drift (another platform or
    /// country than the session was created from) and its place for impossible travel. A caller bound to `tenant` gets `SessionNotValid` for another tenant's session,
    /// decided before anything else happens: its validate must not touch, observe or end a
    /// session it may not see.
    pub async fn validate(
        &self,
        token: &str,
        touch: bool,
        device: Option<Device>,
        tenant: Option<&str>,
    ) -> Result<Session> {
        let parsed = token::parse(token).ok_or(Error::SessionNotValid)?;
        self.store.fence().await?;
        let stored = match self.store.get(&parsed.session_id)? {
            Some(s) if s.is_active() && tenant.is_none_or(|t| t == s.tenant_id) => s,
            _ => return Err(Error::SessionNotValid),
        };
        let now = self.clock.now();
        let (mut session, policy) = self.current(stored, now);
        match session.standing(&parsed.hash, policy.rotation_grace_period, now) {
            Standing::Current | Standing::InGrace => {}
            Standing::Reused(replaced) => {
                // Answered at once, like any invalid token, so neither the status nor the time
                // tells a prober that this token was once good; the policy's action follows.
                self.on_reuse(&session, replaced, parsed.hash, policy, now);
                return Err(Error::SessionNotValid);
            }
            Standing::Unknown => return Err(Error::SessionNotValid),
        }
        if !session.is_active() {
            // Record the ending (and its event) now rather than at the next sweep.
            self.store.end_soon(session.id, policy, now);
            return Err(Error::SessionNotValid);
        }
        if session.bound_token_expired(now) {
            // The session lives on; only this token is stale until a signed refresh.
            return Err(Error::SessionNotValid);
        }
        if let Some(presented) = &device {
            if policy.drift_action != DriftAction::None {
                session = self.check_drift(session, presented, &policy, now).await?;
            }
        }
        let location = device.and_then(|d| d.location);
        if let Some(here) = location.filter(|l| l.coordinates.is_some()) {
            if policy.travel_action != TravelAction::Ignore
                && self.worth_observing(&session, &here, now, &policy)?
            {
                let observed = self
                    .store
                    .observe(session.id, here, now, policy.travel_rules())
                    .await?;
                session = observed;
                session.tighten(&policy);
            }
        }
        if touch && now.since(session.last_seen_at) >= self.touch_every(&session) {
            self.store.touch(session.id, now);
            session.last_seen_at = now;
        }
        Ok(session)
    }

    /// Flags or revokes live `session` if `presented` drifted from the device it was created
    /// from: each kind of drift is judged once per session (a flagged kind costs no write).
    async fn check_drift(
        &self,
        mut session: Session,
        presented: &Device,
        policy: &Arc<Policy>,
        now: Timestamp,
    ) -> Result<Session> {
        let platform = platform_drift(&session.device, &presented.user_agent)
            .map(|(from, to)| (DriftKind::Device, from.to_string(), to.to_string()));
        let place = country_drift(&session.device, presented)
            .map(|(from, to)| (DriftKind::Place, from.to_string(), to.to_string()));
        for (kind, from, to) in platform.into_iter().chain(place) {
            let flagged = session
                .flags
                .iter()
                .any(|f| matches!(f, Flag::Drift(d) if d.kind == kind));
            if flagged {
                continue;
            }
            let drift = Drift {
                flagged_at: now,
                kind,
                from,
                to,
            };
            tracing::info!(session_id = %session.id, ?kind, "session presented from elsewhere");
            let defended = self
                .store
                .defend(session.id, Defence::Drift(drift), policy.clone(), now)
                .await?;
            session = defended.session;
            session.tighten(policy);
            if !session.is_active() {
                return Err(Error::SessionNotValid);
            }
        }
        Ok(session)
    }

    /// Acts on `presented`, the token that rotation `replaced` replaced, shown after its grace
    /// period: the policy's reuse action, after the caller's answer. Nothing to do if the action
    /// is IGNORE, if the session ended, or if it already carries this reuse's flag (FLAG).
    fn on_reuse(
        &self,
        session: &Session,
        replaced: ReplacedToken,
        presented: TokenHash,
        policy: Arc<Policy>,
        now: Timestamp,
    ) {
        let done = match policy.token_reuse_action {
            TokenReuseAction::Ignore => true,
            TokenReuseAction::Flag => session.flagged_for_reuse_of(replaced.rotation),
            TokenReuseAction::Revoke => false,
        };
        if done || !session.is_active() {
            return;
        }
        self.defend_soon(session.id, Defence::Reuse { presented }, policy, now);
    }

    /// Applies a defence in the background: the caller's answer does not wait for it. One per
    /// session at a time (another presentation meanwhile would only repeat it), and at most
    /// `MAX_DEFENCES` in all.
    fn defend_soon(&self, id: SessionId, defence: Defence, policy: Arc<Policy>, now: Timestamp) {
        {
            let mut defending = self.defending.lock().unwrap_or_else(|p| p.into_inner());
            if defending.len() >= MAX_DEFENCES || !defending.insert(id) {
                return;
            }
        }
        let (store, defending) = (self.store.clone(), self.defending.clone());
        tokio::spawn(async move {
            match store.defend(id, defence, policy, now).await {
                Ok(_) | Err(Error::SessionNotValid) => {}
                Err(e) => {
                    tracing::warn!(session_id = %id, error = %e, "a session defence failed")
                }
            }
            defending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    /// How stale a session's stored last use may get before a validate writes a new one: the
    /// configured `touch_interval`, but at most a quarter of the session's idle timeout, so that
    /// a tenant's short idle timeout never ends a session that is used more often than that.
    fn touch_every(&self, session: &Session) -> Duration {
        self.touch_interval.min(session.idle_timeout / 4)
    }

    /// Whether a validate's location must be recorded: it is new, far from the last one, or the
    /// last one is old. Repeated validates from one place cost no write.
    fn worth_observing(
        &self,
        session: &Session,
        here: &Location,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<bool> {
        let Some(last) = self.store.last_seen(&session.tenant_id, &session.user_id)? else {
            return Ok(true);
        };
        let same_place = match (last.location.coordinates, here.coordinates) {
            (Some(a), Some(b)) => distance_km(a, b) <= policy.travel_tolerance_km,
            _ => false,
        };
        Ok(!(same_place
            && last.session_id == session.id
            && now.since(last.at) < self.touch_interval))
    }

    /// Issues a new token for the session of `token`; the old token stops working (at once at a
    /// `privilege_change`, else after the tenant's grace period). A caller bound to `tenant`
    /// cannot rotate another tenant's session.
    ///
    /// Every dead token gets the same `SessionNotValid`, answered before anything is written:
    /// reuse of a replaced token is acted on after the answer, as validate does, so neither the
    /// status nor the time says what the token once was.
    pub async fn rotate(
        &self,
        token: &str,
        tenant: Option<&str>,
        privilege_change: bool,
    ) -> Result<Rotated> {
        let parsed = token::parse(token).ok_or(Error::SessionNotValid)?;
        let now = self.clock.now();
        // Judged by its tenant's policy in force: a tightened policy must not let a rotation
        // revive a session that validate already refuses.
        let (session, policy) = match self.store.get(&parsed.session_id)? {
            Some(s) if s.is_active() && tenant.is_none_or(|t| t == s.tenant_id) => {
                self.current(s, now)
            }
            _ => return Err(Error::SessionNotValid),
        };
        match session.standing(&parsed.hash, policy.rotation_grace_period, now) {
            Standing::Current => {}
            Standing::Reused(replaced) => {
                self.on_reuse(&session, replaced, parsed.hash, policy, now);
                return Err(Error::SessionNotValid);
            }
            Standing::InGrace | Standing::Unknown => return Err(Error::SessionNotValid),
        }
        if !session.is_active() {
            self.store.end_soon(session.id, policy, now);
            return Err(Error::SessionNotValid);
        }
        if session.bound_token_expired(now) {
            return Err(Error::SessionNotValid);
        }
        let issued = self.tokens.issue(&parsed.session_id);
        let rotation = Rotation {
            current: parsed.hash,
            replacement: issued.hash,
            privilege_change,
        };
        let outcome = self
            .store
            .rotate(parsed.session_id, rotation, policy, now)
            .await?;
        tracing::info!(session_id = %parsed.session_id, privilege_change, "session rotated to a new secret");
        let (session, policy) = self.current(outcome.session, now);
        let cookie = self.cookie_advice(&session, &policy, now);
        Ok(Rotated {
            session,
            token: issued.token,
            sequence: outcome.sequence,
            cookie,
        })
    }

    /// A fresh, single-use challenge for device-bound session `id`'s next refresh, answerable
    /// for [`CHALLENGE_TTL`], sealed (see `model::binding`): handing it out writes nothing.
    /// Another tenant's session is not found for a tenant-bound caller.
    pub fn binding_challenge(&self, id: &SessionId, tenant: Option<&str>) -> Result<Challenged> {
        let now = self.clock.now();
        let stored = self
            .store
            .get(id)?
            .filter(|s| tenant.is_none_or(|t| t == s.tenant_id))
            .ok_or(Error::SessionNotFound(*id))?;
        let (session, _) = self.current(stored, now);
        if !session.is_active() {
            return Err(Error::FailedPrecondition(
                "session_id: the session has ended".into(),
            ));
        }
        if session.binding.is_none() {
            return Err(Error::FailedPrecondition(
                "session_id: the session is not device-bound".into(),
            ));
        }
        Ok(self.challenge(&session, now.saturating_add(CHALLENGE_TTL)))
    }

    /// The challenge a bound session's creation or refresh hands its device for the next
    /// refresh: answerable until a minute after the current token ends, when the device will
    /// refresh.
    fn carried_challenge(&self, session: &Session, now: Timestamp) -> Challenged {
        let ends = session.bound_token_expires_at().unwrap_or(now);
        self.challenge(session, ends.saturating_add(CHALLENGE_TTL))
    }

    /// A new sealed challenge for `session`'s next refresh (its current refresh generation),
    /// answerable until `expires_at`.
    fn challenge(&self, session: &Session, expires_at: Timestamp) -> Challenged {
        let id_text = session.id.to_string();
        let challenge = Challenge {
            nonce: self.tokens.nonce(),
            expires_at,
            generation: Some(session.rotation_count),
        };
        Challenged {
            challenge: self.seal.seal(&id_text, &challenge),
            expires_at: challenge.expires_at,
        }
    }

    /// A new token for device-bound session `id`, against `proof`: a compact JWS (ES256,
    /// `typ` `dbsc+jwt`) signed by the session's device key over `{"jti": <an outstanding
    /// challenge>, "sub": <id>, "iat": <now, within a minute>}`. Every failure is the same
    /// `SessionNotValid` and changes nothing. The answer carries the next refresh's challenge,
    /// as DBSC's refresh response does, so a device needs one call per refresh: it answers until
    /// a minute after the new token ends, when the device will next refresh. (A bound session's
    /// creation hands out the first one the same way.)
    pub async fn refresh_bound(
        &self,
        id: &SessionId,
        proof: &str,
        tenant: Option<&str>,
    ) -> Result<Refreshed> {
        let now = self.clock.now();
        let stored = match self.store.get(id)? {
            Some(s) if s.is_active() && tenant.is_none_or(|t| t == s.tenant_id) => s,
            _ => return Err(Error::SessionNotValid),
        };
        let (session, policy) = self.current(stored, now);
        let binding = session.binding.as_ref().ok_or(Error::SessionNotValid)?;
        let proof = verify_proof(&binding.key, proof).map_err(|_| Error::SessionNotValid)?;
        let id_text = id.to_string();
        if proof.sub != id_text || !iat_is_fresh(proof.iat, now) {
            return Err(Error::SessionNotValid);
        }
        let challenge = self
            .seal
            .open(&id_text, &proof.jti)
            .filter(|c| c.expires_at > now)
            .ok_or(Error::SessionNotValid)?;
        let issued = self.tokens.issue(id);
        let refresh = Defence::Refresh {
            challenge,
            replacement: issued.hash,
        };
        let defended = self.store.defend(*id, refresh, policy, now).await?;
        tracing::info!(session_id = %id, "device-bound session refreshed");
        let (session, policy) = self.current(defended.session, now);
        let cookie = self.cookie_advice(&session, &policy, now);
        let next_challenge = self.carried_challenge(&session, now);
        Ok(Refreshed {
            rotated: Rotated {
                session,
                token: issued.token,
                sequence: defended.sequence,
                cookie,
            },
            next_challenge,
        })
    }

    /// A session by id, live or ended. A session past a deadline is shown as ended at once,
    /// even before the sweeper records it, so every read agrees with what a validate answers.
    pub fn get(&self, id: &SessionId) -> Result<Session> {
        let now = self.clock.now();
        let stored = self
            .store
            .get(id)?
            // A tombstone due for purging is gone, whether or not the sweeper got to it yet.
            .filter(|s| s.is_active() || now < s.purge_at())
            .ok_or(Error::SessionNotFound(*id))?;
        Ok(self.current(stored, now).0)
    }

    /// A page of live sessions.
    pub fn list(&self, query: &ListQuery) -> Result<Page> {
        let page = self
            .store
            .list(&query.scope, query.cursor.as_deref(), query.page_size)?;
        let now = self.clock.now();
        Ok(Page {
            // Past a deadline but not yet swept: already dead to a validate, so not listed.
            sessions: page
                .sessions
                .into_iter()
                .map(|s| self.current(s, now).0)
                .filter(|s| s.is_active() && query.filter.matches(s, now))
                .collect(),
            next: page.next,
        })
    }

    /// Revokes sessions; already ended ones are skipped.
    pub async fn revoke(&self, target: RevokeTarget, reason: RevokeReason) -> Result<Revoked> {
        let outcome = self.store.revoke(target, reason, self.clock.now()).await?;
        if !outcome.revoked.is_empty() {
            tracing::info!(count = outcome.revoked.len(), ?reason, "sessions revoked");
        }
        let now = self.clock.now();
        Ok(Revoked {
            revoked: outcome.revoked,
            sessions: outcome
                .sessions
                .into_iter()
                .map(|s| self.current(s, now).0)
                .collect(),
            sequence: outcome.sequence,
        })
    }
}

impl<S: SessionStore> Sessions<S> {
    /// Records an administrative action in the audit trail, durably.
    pub async fn audit(
        &self,
        caller: &str,
        role: &str,
        action: &str,
        tenant_id: Option<&str>,
        detail: String,
    ) -> Result<u64> {
        let entry = crate::model::audit::AuditEntry {
            id: 0,
            at: self.clock.now(),
            caller: caller.to_string(),
            role: role.to_string(),
            action: action.to_string(),
            tenant_id: tenant_id.map(str::to_string),
            detail,
        };
        self.store.append_audit(entry).await
    }

    /// Applies a tenant's current policy to all its open sessions, in batches: tightened
    /// timeouts are stored and sessions already past them end now, with their events (so caches
    /// hear of it). Returns how many sessions changed. Clears the mark the policy write left,
    /// unless a newer write left another, so a restart resumes only unfinished enforcement.
    pub async fn enforce_policy(&self, tenant_id: &str) -> Result<usize> {
        let mark = self.store.enforcement_pending(tenant_id)?;
        let scope = ListScope {
            tenant_id: tenant_id.to_string(),
            user_id: None,
        };
        let mut pages = self.pages(&scope);
        let mut changed = 0;
        while let Some(batch) = pages.next().await? {
            let ids = batch.iter().map(|s| s.id).collect();
            let policy = self.policies.for_tenant(tenant_id);
            changed += self.store.enforce(ids, policy, self.clock.now()).await?;
        }
        if let Some(mark) = mark {
            self.store
                .enforcement_done(tenant_id.to_string(), mark)
                .await?;
        }
        Ok(changed)
    }

    /// Walks the active sessions of `scope` a batch at a time.
    fn pages(&self, scope: &ListScope) -> Pages<S> {
        Pages {
            store: self.store.clone(),
            scope: scope.clone(),
            cursor: None,
            done: false,
        }
    }
}

/// A scope's active sessions in batches of [`BULK_BATCH`]. Each batch is one store read on a
/// blocking thread ([`store::scan`]), so writes interleave between batches, no long scan holds
/// anything, and the async workers stay free.
struct Pages<S> {
    store: Arc<S>,
    scope: ListScope,
    cursor: Option<Vec<u8>>,
    done: bool,
}

impl<S: SessionStore> Pages<S> {
    async fn next(&mut self) -> Result<Option<Vec<Session>>> {
        if self.done {
            return Ok(None);
        }
        let (store, scope, cursor) = (self.store.clone(), self.scope.clone(), self.cursor.take());
        let page = store::scan(move || store.list(&scope, cursor.as_deref(), BULK_BATCH)).await?;
        match page.next {
            Some(next) => self.cursor = Some(next),
            None => self.done = true,
        }
        Ok(Some(page.sessions))
    }
}

/// Sessions per store command in bulk work (policy enforcement, bulk revocation, stats): big
/// enough to be efficient, small enough that other writes interleave.
const BULK_BATCH: usize = 256;
/// Sessions shown in a bulk revocation's sample.
const SAMPLE: usize = 10;

impl<S: SessionStore> Sessions<S> {
    /// Revokes (or, in a dry run, counts) the live sessions in scope that match the filter, a
    /// batch at a time.
    pub async fn revoke_matching(&self, query: MatchQuery) -> Result<Matched> {
        let mut matched = 0u64;
        let mut sample = Vec::new();
        let mut sequence = self.store.events().durable_head();
        let mut pages = self.pages(&query.scope);
        while let Some(batch) = pages.next().await? {
            let now = self.clock.now();
            let hits: Vec<Session> = batch
                .into_iter()
                .map(|s| self.current(s, now).0)
                .filter(|s| s.is_active() && query.filter.matches(s, now))
                .collect();
            let room = SAMPLE.saturating_sub(sample.len());
            sample.extend(hits.iter().take(room).cloned());
            if query.dry_run {
                matched += hits.len() as u64;
            } else if !hits.is_empty() {
                let ids = hits.iter().map(|s| s.id).collect();
                let outcome = self
                    .store
                    .revoke(RevokeTarget::AnyOf(ids), query.reason, now)
                    .await?;
                matched += outcome.revoked.len() as u64;
                sequence = outcome.sequence;
            }
        }
        if !query.dry_run && matched > 0 {
            tracing::info!(tenant_id = %query.scope.tenant_id, matched, reason = ?query.reason, "bulk revocation");
        }
        Ok(Matched {
            matched,
            sample,
            sequence,
        })
    }

    /// Counts for a tenant: live ones from its sessions, the last day's from the event log (both
    /// read on blocking threads).
    pub async fn stats(&self, tenant_id: &str) -> Result<Stats> {
        let scope = ListScope {
            tenant_id: tenant_id.to_string(),
            user_id: None,
        };
        let now = self.clock.now();
        let mut stats = Stats::default();
        let mut last_user: Option<String> = None;
        let mut pages = self.pages(&scope);
        while let Some(batch) = pages.next().await? {
            // Ordered by user, so counting distinct users needs only the previous one.
            for s in batch.into_iter().map(|s| self.current(s, now).0) {
                if !s.is_active() {
                    continue;
                }
                stats.live_sessions += 1;
                stats.flagged_sessions += u64::from(!s.flags.is_empty());
                if last_user.as_deref() != Some(s.user_id.as_str()) {
                    stats.distinct_users += 1;
                    last_user = Some(s.user_id);
                }
            }
        }
        let since = now.saturating_sub(Duration::from_secs(86_400));
        let (store, tenant) = (self.store.clone(), tenant_id.to_string());
        let (created, revoked, expired, novel) = store::scan(move || {
            let (mut created, mut expired) = (0, 0);
            let mut novel = (0, 0);
            let mut revoked: std::collections::HashMap<RevokeReason, u64> = Default::default();
            store.visit_events_since(since, &mut |e| {
                if e.tenant_id != tenant {
                    return;
                }
                match &e.kind {
                    crate::events::EventKind::Created {
                        new_device,
                        new_place,
                        ..
                    } => {
                        created += 1;
                        novel.0 += u64::from(*new_device);
                        novel.1 += u64::from(*new_place);
                    }
                    crate::events::EventKind::Revoked { reason } => {
                        *revoked.entry(*reason).or_default() += 1
                    }
                    crate::events::EventKind::Expired { .. } => expired += 1,
                    _ => {}
                }
            })?;
            Ok((created, revoked, expired, novel))
        })
        .await?;
        (
            stats.new_device_logins_last_24h,
            stats.new_place_logins_last_24h,
        ) = novel;
        stats.created_last_24h = created;
        stats.expired_last_24h = expired;
        stats.revoked_last_24h = revoked.into_iter().collect();
        Ok(stats)
    }
}
