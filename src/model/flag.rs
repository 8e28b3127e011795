//! Flags: what the service noticed on a session that may mean it was hijacked (impossible travel,
//! a replaced token presented again, a login from a new device or place, a session presented from
//! another browser or country than it was created from). A flag never ends a session by itself;
//! the tenant's policy decides whether the same finding revokes instead. Pure data.

use crate::{clock::Timestamp, model::travel::TravelFlag};

/// Most flags kept per session: the newest.
pub const MAX_FLAGS: usize = 8;

/// One finding on a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Flag {
    /// The user seemed to travel faster than possible.
    Travel(TravelFlag),
    /// A token that rotation had replaced was presented after the grace period: the thief or the
    /// user holds a stale copy.
    TokenReuse(TokenReuse),
    /// The session's login came from a device none of the user's recent sessions came from.
    NewDevice { flagged_at: Timestamp },
    /// The session's login came from a country (or city) none of the user's recent sessions did.
    NewPlace { flagged_at: Timestamp },
    /// The session was presented from another browser, OS or country than it was created from.
    Drift(Drift),
}

/// Which token was reused: the one replaced by rotation number `rotation` (1: the token that
/// CreateSession returned), replaced at `replaced_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenReuse {
    pub flagged_at: Timestamp,
    pub rotation: u32,
    pub replaced_at: Timestamp,
}

/// What drifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriftKind {
    /// Browser family or operating system.
    Device,
    /// Country.
    Place,
}

/// A session presented from elsewhere than it was created: `from` is what it was created with,
/// `to` what it was presented with (e.g. "Chrome on Windows" and "Firefox on Linux", or "TH" and
/// "GB").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub flagged_at: Timestamp,
    pub kind: DriftKind,
    pub from: String,
    pub to: String,
}

impl Flag {
    pub fn flagged_at(&self) -> Timestamp {
        match self {
            Flag::Travel(f) => f.flagged_at,
            Flag::TokenReuse(r) => r.flagged_at,
            Flag::NewDevice { flagged_at } | Flag::NewPlace { flagged_at } => *flagged_at,
            Flag::Drift(d) => d.flagged_at,
        }
    }
}

/// Adds `flag` to `flags`, keeping the newest [`MAX_FLAGS`].
pub fn push_flag(flags: &mut Vec<Flag>, flag: Flag) {
    flags.push(flag);
    let excess = flags.len().saturating_sub(MAX_FLAGS);
    flags.drain(..excess);
}
