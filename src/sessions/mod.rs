//! The domain: creating, validating, rotating, listing and revoking sessions, with their timeouts
//! and per-user limit. Knows nothing of gRPC or sled: it talks to a [`SessionStore`] and reads
//! time from a [`Clock`].

pub mod model;
pub mod sweeper;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

pub use sweeper::{run_sweeper, Retention};

use self::model::{Device, RevokeReason, Session, SessionState};
use crate::{
    clock::Clock,
    config::Config,
    error::{Error, Result},
    store::{ListScope, RevokeTarget, SessionStore},
    token::{self, SessionId, SessionToken, TokenGenerator},
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
}

/// The settings the domain needs, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub remember_me_idle_timeout: Duration,
    pub remember_me_absolute_timeout: Duration,
    pub max_sessions_per_user: usize,
    pub touch_interval: Duration,
}

impl From<&Config> for Settings {
    fn from(c: &Config) -> Self {
        Self {
            idle_timeout: c.idle_timeout,
            absolute_timeout: c.absolute_timeout,
            remember_me_idle_timeout: c.remember_me_idle_timeout,
            remember_me_absolute_timeout: c.remember_me_absolute_timeout,
            max_sessions_per_user: usize::try_from(c.max_sessions_per_user).unwrap_or(usize::MAX),
            touch_interval: c.touch_interval,
        }
    }
}

/// A validated request to start a session.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub tenant_id: String,
    pub user_id: String,
    pub remember_me: bool,
    pub device: Device,
    pub attributes: BTreeMap<String, String>,
}

/// A started session and the token to hand to the client.
#[derive(Debug)]
pub struct Created {
    pub session: Session,
    pub token: SessionToken,
    pub evicted: Vec<SessionId>,
    pub sequence: u64,
}

/// A rotated session and its new token.
#[derive(Debug)]
pub struct Rotated {
    pub session: Session,
    pub token: SessionToken,
    pub sequence: u64,
}

/// A validated listing request.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub scope: ListScope,
    pub page_size: usize,
    /// Opaque cursor from the previous page.
    pub cursor: Option<Vec<u8>>,
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
    pub sequence: u64,
}

/// The session authority's operations.
pub struct Sessions<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    tokens: TokenGenerator,
    settings: Settings,
}

impl<S: SessionStore> Sessions<S> {
    pub fn new(
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        tokens: TokenGenerator,
        settings: Settings,
    ) -> Self {
        Self {
            store,
            clock,
            tokens,
            settings,
        }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Starts a session, evicting the user's least recently used ones beyond the limit.
    pub async fn create(&self, new: NewSession) -> Result<Created> {
        let now = self.clock.now();
        let (idle, absolute) = if new.remember_me {
            (
                self.settings.remember_me_idle_timeout,
                self.settings.remember_me_absolute_timeout,
            )
        } else {
            (self.settings.idle_timeout, self.settings.absolute_timeout)
        };
        let id = self.tokens.session_id();
        let issued = self.tokens.issue(&id);
        let session = Session {
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
        };
        let outcome = self
            .store
            .create(session.clone(), self.settings.max_sessions_per_user)
            .await?;
        tracing::info!(
            session_id = %session.id,
            tenant_id = %session.tenant_id,
            evicted = outcome.evicted.len(),
            "session created"
        );
        Ok(Created {
            session,
            token: issued.token,
            evicted: outcome.evicted,
            sequence: outcome.sequence,
        })
    }

    /// The live session a token belongs to. Every failure is the same `SessionNotValid`.
    pub fn validate(&self, token: &str, touch: bool) -> Result<Session> {
        let parsed = token::parse(token).ok_or(Error::SessionNotValid)?;
        let mut session = match self.store.get(&parsed.session_id)? {
            Some(s) if s.is_active() && s.token_hash.matches(&parsed.hash) => s,
            _ => return Err(Error::SessionNotValid),
        };
        let now = self.clock.now();
        if session.expiry_at(now).is_some() {
            // The sweeper would find it too; this records the expiry (and its event) sooner.
            self.store.expire_soon(session.id, now);
            return Err(Error::SessionNotValid);
        }
        if touch && now.since(session.last_seen_at) >= self.settings.touch_interval {
            self.store.touch(session.id, now);
            session.last_seen_at = now;
        }
        Ok(session)
    }

    /// Issues a new token for the session of `token`; the old token stops working.
    pub async fn rotate(&self, token: &str) -> Result<Rotated> {
        let parsed = token::parse(token).ok_or(Error::SessionNotValid)?;
        let issued = self.tokens.issue(&parsed.session_id);
        let outcome = self
            .store
            .rotate(
                parsed.session_id,
                parsed.hash,
                issued.hash,
                self.clock.now(),
            )
            .await?;
        tracing::info!(session_id = %parsed.session_id, "session token rotated");
        Ok(Rotated {
            session: outcome.session,
            token: issued.token,
            sequence: outcome.sequence,
        })
    }

    /// A session by id, live or ended. A session past a deadline is shown as expired at once,
    /// even before the sweeper records it, so every read agrees with what a validate answers.
    pub fn get(&self, id: &SessionId) -> Result<Session> {
        let mut session = self.store.get(id)?.ok_or(Error::SessionNotFound(*id))?;
        if session.is_active() {
            if let Some(kind) = session.expiry_at(self.clock.now()) {
                session.state = SessionState::Expired {
                    at: session.deadline_of(kind),
                    kind,
                };
            }
        }
        Ok(session)
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
                .filter(|s| s.is_live_at(now))
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
        Ok(Revoked {
            revoked: outcome.revoked,
            sequence: outcome.sequence,
        })
    }
}
