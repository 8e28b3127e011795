//! What happened to a session, as recorded in the durable event log.

use crate::{
    clock::Timestamp,
    model::{
        flag::Flag,
        session::{Device, ExpiryKind, RevokeReason},
    },
    token::SessionId,
};

/// One entry of the event log. `sequence` is strictly increasing with no holes.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub sequence: u64,
    pub occurred_at: Timestamp,
    pub tenant_id: String,
    pub user_id: String,
    pub session_id: SessionId,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Created {
        device: Device,
        remember_me: bool,
        /// Sessions this creation evicted (each also has its own `Revoked` event).
        evicted: Vec<SessionId>,
        /// The login came from a device, or a place, none of the user's recent ones came from.
        new_device: bool,
        new_place: bool,
    },
    Revoked {
        reason: RevokeReason,
    },
    Expired {
        kind: ExpiryKind,
    },
    /// The session's token changed; the old token is dead.
    Rotated,
    /// Something suspicious was seen on the session (see [`Flag`]).
    Flagged {
        flag: Flag,
    },
}

/// The kinds, for filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Created,
    Revoked,
    Expired,
    Rotated,
    Flagged,
}

impl EventKind {
    pub fn event_type(&self) -> EventType {
        match self {
            EventKind::Created { .. } => EventType::Created,
            EventKind::Revoked { .. } => EventType::Revoked,
            EventKind::Expired { .. } => EventType::Expired,
            EventKind::Rotated => EventType::Rotated,
            EventKind::Flagged { .. } => EventType::Flagged,
        }
    }
}

impl EventType {
    /// The kind's name in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            EventType::Created => "created",
            EventType::Revoked => "revoked",
            EventType::Expired => "expired",
            EventType::Rotated => "rotated",
            EventType::Flagged => "flagged",
        }
    }
}
