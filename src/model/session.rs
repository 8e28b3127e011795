//! The session as the domain sees it, and the rules that are pure functions of it (deadlines,
//! which sessions to evict). No I/O here: the store calls these inside its atomic writes.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use crate::{
    clock::Timestamp,
    model::{binding::Binding, flag::Flag, policy::Policy},
    token::{SessionId, TokenHash},
};

/// Where a client is, as far as the caller knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Location {
    /// ISO 3166-1 alpha-2, upper case; empty if unknown.
    pub country: String,
    /// Free text; empty if unknown.
    pub city: String,
    /// Latitude and longitude in degrees, if known (always both or neither).
    pub coordinates: Option<(f64, f64)>,
}

/// What the caller knows about the client device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Device {
    pub ip: Option<IpAddr>,
    pub user_agent: String,
    pub label: String,
    pub location: Option<Location>,
}

/// Why a session was revoked. Mirrors the proto enum; `LimitEviction` is the service's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevokeReason {
    UserLogout,
    UserLogoutOthers,
    Admin,
    LimitEviction,
    SuspiciousActivity,
    Policy,
    /// A token that rotation replaced was presented after the grace period. The service's own.
    TokenReuse,
}

/// Which deadline a session passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryKind {
    Idle,
    Absolute,
}

/// Whether a session is live, and if not how it ended. Ended sessions are kept as tombstones for
/// the configured `tombstone_retention`, so that admins can see how they ended and repeated
/// revokes are answered consistently, then purged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Active,
    Revoked { at: Timestamp, reason: RevokeReason },
    Expired { at: Timestamp, kind: ExpiryKind },
}

/// A user session. Holds the hash of its current token, never the token.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: SessionId,
    pub tenant_id: String,
    pub user_id: String,
    pub token_hash: TokenHash,
    pub created_at: Timestamp,
    /// Last use, as stored: at most `touch_interval` behind the true last use.
    pub last_seen_at: Timestamp,
    /// Fixed at creation from the timeouts in force then.
    pub idle_timeout: Duration,
    pub absolute_expires_at: Timestamp,
    pub remember_me: bool,
    pub device: Device,
    pub attributes: BTreeMap<String, String>,
    pub state: SessionState,
    pub rotation_count: u32,
    /// When the tenant's maximum session age ends it (revoked, reason `Policy`), if it has one.
    pub max_age_at: Option<Timestamp>,
    /// What was noticed on this session, oldest first (the newest
    /// [`MAX_FLAGS`](crate::model::flag::MAX_FLAGS) kept).
    pub flags: Vec<Flag>,
    /// The tokens rotation replaced, newest last (at most [`MAX_REPLACED`]), so that presenting
    /// one again is recognised as reuse. Cleared when the session ends.
    pub replaced: Vec<ReplacedToken>,
    /// The login came from a device, or a place, that none of the user's recent sessions came
    /// from (never for a user's first session: nothing to compare with).
    pub new_device: bool,
    pub new_place: bool,
    /// The device key this session is bound to, if it was created with one: its tokens then
    /// live `bound_token_ttl` and are renewed only against a signed proof.
    pub binding: Option<Binding>,
    /// When this session's tombstone is purged; set when it ends. Stored rather than computed,
    /// so that changing the retention setting never strands an index entry.
    pub purge_at: Option<Timestamp>,
}

/// A token that rotation replaced: by rotation number `rotation` (1 replaced the token that the
/// create returned), at `replaced_at`. A device-bound session's token also had an end of its own
/// (`expires_at`): its grace never outlasts it, so a refresh cannot revive a stolen token that
/// had already expired.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplacedToken {
    pub hash: TokenHash,
    pub rotation: u32,
    pub replaced_at: Timestamp,
    pub expires_at: Option<Timestamp>,
}

/// What a presented token is to a session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Standing {
    /// Its token.
    Current,
    /// A token rotation replaced within the grace period: still valid.
    InGrace,
    /// A token rotation replaced, presented after the grace period.
    Reused(ReplacedToken),
    /// Not one of its tokens.
    Unknown,
}

/// Most replaced tokens remembered per session.
pub const MAX_REPLACED: usize = 8;

/// How an active session ends when a deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Idle or absolute timeout: the session expires.
    Expired(ExpiryKind),
    /// Older than the tenant's maximum age: the session is revoked for policy.
    TooOld,
}

impl Session {
    /// When the session ends if it is not used again.
    pub fn idle_expires_at(&self) -> Timestamp {
        self.last_seen_at
            .saturating_add(self.idle_timeout)
            .min(self.absolute_expires_at)
    }

    /// When the sweeper should look at this session again: its earliest deadline while active,
    /// its purge time once ended.
    pub fn next_deadline(&self) -> Timestamp {
        match self.state {
            SessionState::Active => self
                .max_age_at
                .map_or(self.idle_expires_at(), |t| t.min(self.idle_expires_at())),
            _ => self.purge_at(),
        }
    }

    /// How an active session ends at `now`, if a deadline has passed: by whichever came first.
    /// On a tie the absolute deadline wins (no activity could have moved it), then the maximum
    /// age.
    pub fn ending_at(&self, now: Timestamp) -> Option<Ending> {
        let candidates = [
            (
                self.absolute_expires_at,
                Ending::Expired(ExpiryKind::Absolute),
            ),
            (
                self.max_age_at.unwrap_or(Timestamp::from_millis(u64::MAX)),
                Ending::TooOld,
            ),
            (self.idle_expires_at(), Ending::Expired(ExpiryKind::Idle)),
        ];
        candidates
            .into_iter()
            .filter(|(at, _)| now >= *at)
            .min_by_key(|(at, _)| *at)
            .map(|(_, ending)| ending)
    }

    /// Applies `policy` to this session where it is stricter: shorter timeouts and a maximum age
    /// apply to sessions already open; a looser policy never lengthens one. In place, because
    /// every validate does it.
    pub fn tighten(&mut self, policy: &Policy) {
        let (idle, absolute) = policy.timeouts(self.remember_me);
        self.idle_timeout = self.idle_timeout.min(idle);
        self.absolute_expires_at = self
            .absolute_expires_at
            .min(self.created_at.saturating_add(absolute));
        if let Some(age) = policy.max_session_age {
            let at = self.created_at.saturating_add(age);
            self.max_age_at = Some(self.max_age_at.map_or(at, |t| t.min(at)));
        }
        if let Some(b) = self.binding.as_mut() {
            b.token_expires_at = b
                .token_expires_at
                .min(b.token_issued_at.saturating_add(policy.bound_token_ttl));
        }
    }

    /// The state of this session once `ending` ends it, noticed at `now`. The one rule for how
    /// an ended session looks, whether a read computes it or a write stores it: the ending is
    /// dated at the deadline that passed, not at when somebody noticed.
    pub fn ended_by(&self, ending: Ending, now: Timestamp) -> SessionState {
        match ending {
            Ending::Expired(kind) => SessionState::Expired {
                at: self.deadline_of(kind),
                kind,
            },
            Ending::TooOld => SessionState::Revoked {
                at: self.max_age_at.unwrap_or(now),
                reason: RevokeReason::Policy,
            },
        }
    }

    /// When an ended session's tombstone is deleted (never, for a live one).
    pub fn purge_at(&self) -> Timestamp {
        self.purge_at.unwrap_or(Timestamp::from_millis(u64::MAX))
    }

    /// The instant a deadline of this kind falls.
    pub fn deadline_of(&self, kind: ExpiryKind) -> Timestamp {
        match kind {
            ExpiryKind::Absolute => self.absolute_expires_at,
            ExpiryKind::Idle => self.idle_expires_at(),
        }
    }

    /// What token `hash` is to this session, `grace` being how long a replaced one still counts.
    pub fn standing(&self, hash: &TokenHash, grace: Duration, now: Timestamp) -> Standing {
        if self.token_hash.matches(hash) {
            return Standing::Current;
        }
        match self.replaced_token(hash) {
            // Past its own end it is an expired token like any other: refused, and not reuse
            // (a bound session's device presents its expired token before it refreshes).
            Some(r) if r.expires_at.is_some_and(|end| now >= end) => Standing::Unknown,
            Some(r) if now.since(r.replaced_at) < grace => Standing::InGrace,
            Some(r) => Standing::Reused(r),
            None => Standing::Unknown,
        }
    }

    /// When a device-bound session's current token stops validating; `None` for an unbound
    /// session.
    pub fn bound_token_expires_at(&self) -> Option<Timestamp> {
        self.binding.as_ref().map(|b| b.token_expires_at)
    }

    /// Whether a device-bound session's current token has ended (it stops validating; the
    /// session lives on until a signed refresh). False for an unbound session.
    pub fn bound_token_expired(&self, now: Timestamp) -> bool {
        self.bound_token_expires_at().is_some_and(|end| now >= end)
    }

    /// Whether the session carries the reuse flag of the token rotation number `rotation`
    /// replaced: FLAG flags each reused token once.
    pub fn flagged_for_reuse_of(&self, rotation: u32) -> bool {
        self.flags
            .iter()
            .any(|f| matches!(f, Flag::TokenReuse(r) if r.rotation == rotation))
    }

    /// The replaced token `hash` is, if it is one.
    pub fn replaced_token(&self, hash: &TokenHash) -> Option<ReplacedToken> {
        // Every entry is compared (in constant time each), so timing does not say which matched.
        self.replaced.iter().fold(None, |found, r| {
            if r.hash.matches(hash) {
                Some(*r)
            } else {
                found
            }
        })
    }

    pub fn is_active(&self) -> bool {
        self.state == SessionState::Active
    }

    /// Live at `now`: active and before every deadline.
    pub fn is_live_at(&self, now: Timestamp) -> bool {
        self.is_active() && self.ending_at(now).is_none()
    }
}

/// Picks which of a user's live sessions to evict so that one more fits under `limit`: the least
/// recently used first, ties broken by creation time and id so the choice is deterministic.
pub fn sessions_to_evict(live: &[Session], limit: usize) -> Vec<SessionId> {
    let excess = (live.len() + 1).saturating_sub(limit);
    let mut by_use: Vec<&Session> = live.iter().collect();
    by_use.sort_by_key(|s| (s.last_seen_at, s.created_at, s.id));
    by_use.into_iter().take(excess).map(|s| s.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenGenerator;

    fn session(generator: &TokenGenerator, created: u64, seen: u64) -> Session {
        let id = generator.session_id(Timestamp::from_millis(created));
        Session {
            id,
            tenant_id: "t".into(),
            user_id: "u".into(),
            token_hash: generator.issue(&id).hash,
            created_at: Timestamp::from_millis(created),
            last_seen_at: Timestamp::from_millis(seen),
            idle_timeout: Duration::from_millis(100),
            absolute_expires_at: Timestamp::from_millis(created + 1000),
            remember_me: false,
            device: Device::default(),
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
        }
    }

    #[test]
    fn idle_deadline_slides_but_never_past_the_absolute_one() {
        let g = TokenGenerator::from_seed([0; 32]);
        let s = session(&g, 0, 950);
        assert_eq!(s.idle_expires_at(), Timestamp::from_millis(1000));
        assert_eq!(s.ending_at(Timestamp::from_millis(999)), None);
        assert_eq!(
            s.ending_at(Timestamp::from_millis(1000)),
            Some(Ending::Expired(ExpiryKind::Absolute))
        );
        let s = session(&g, 0, 10);
        assert_eq!(
            s.ending_at(Timestamp::from_millis(110)),
            Some(Ending::Expired(ExpiryKind::Idle))
        );
        let mut s = session(&g, 0, 10);
        s.max_age_at = Some(Timestamp::from_millis(50));
        assert_eq!(
            s.ending_at(Timestamp::from_millis(60)),
            Some(Ending::TooOld)
        );
        assert_eq!(s.next_deadline(), Timestamp::from_millis(50));
    }

    #[test]
    fn eviction_takes_the_least_recently_used() {
        let g = TokenGenerator::from_seed([1; 32]);
        let live = vec![session(&g, 0, 50), session(&g, 1, 10), session(&g, 2, 30)];
        assert_eq!(sessions_to_evict(&live, 3), vec![live[1].id]);
        assert_eq!(sessions_to_evict(&live, 2), vec![live[1].id, live[2].id]);
        assert!(sessions_to_evict(&live, 4).is_empty());
    }
}
