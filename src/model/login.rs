//! New-device and new-place signals: a user's recent logins (bounded, kept for the configured
//! `login_history_retention`), and the pure rule that tells whether a login came from a device or
//! a place none of them came from. The store keeps the history; the create planner decides.

use std::time::Duration;

use crate::{
    clock::Timestamp,
    model::{platform::platform, session::Device},
};

/// Most logins remembered per user (the newest).
pub const MAX_LOGINS: usize = 32;

/// One login of a user: what it came from, as far as it can be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub at: Timestamp,
    /// Browser family and OS ("Chrome on Windows"); empty if the user agent said too little.
    pub platform: String,
    /// The caller's device label, if it gave one.
    pub label: String,
    /// ISO country code; empty if unknown.
    pub country: String,
    /// Empty if unknown.
    pub city: String,
}

impl Login {
    /// A login at `at` from `device`.
    pub fn from_device(device: &Device, at: Timestamp) -> Self {
        let place = device.location.as_ref();
        Self {
            at,
            platform: platform(&device.user_agent)
                .map(|p| p.to_string())
                .unwrap_or_default(),
            label: device.label.clone(),
            country: place.map(|l| l.country.clone()).unwrap_or_default(),
            city: place.map(|l| l.city.clone()).unwrap_or_default(),
        }
    }

    /// Whether it says anything to compare: a platform, a label or a country. A login that says
    /// nothing (a service-to-service session, a client without a user agent) is not remembered:
    /// it would be neither new nor evidence that a later login is not.
    pub fn is_comparable(&self) -> bool {
        !self.platform.is_empty() || !self.label.is_empty() || !self.country.is_empty()
    }

    /// The same device: same platform, and the same label when this login gives one.
    fn same_device(&self, other: &Login) -> bool {
        self.platform == other.platform && (self.label.is_empty() || self.label == other.label)
    }

    /// The same place: same country, and the same city when both know it.
    fn same_place(&self, other: &Login) -> bool {
        self.country == other.country
            && (self.city.is_empty() || other.city.is_empty() || self.city == other.city)
    }
}

/// What a login is, compared with the user's recent history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Novelty {
    pub new_device: bool,
    pub new_place: bool,
}

/// Compares `login` with `history` (the user's logins within `window` of it). A user with no
/// recent login has nothing to compare with: nothing is new. A login that says too little (no
/// recognisable platform and no label; no country) is never new in that respect.
pub fn novelty(login: &Login, history: &[Login], window: Duration) -> Novelty {
    let since = login.at.saturating_sub(window);
    let recent: Vec<&Login> = history.iter().filter(|l| l.at > since).collect();
    if recent.is_empty() {
        return Novelty::default();
    }
    let knows_device = !login.platform.is_empty() || !login.label.is_empty();
    Novelty {
        new_device: knows_device && !recent.iter().any(|l| login.same_device(l)),
        new_place: !login.country.is_empty() && !recent.iter().any(|l| login.same_place(l)),
    }
}

/// `history` with `login` added, logins older than `window` dropped and at most [`MAX_LOGINS`]
/// kept.
pub fn remember(mut history: Vec<Login>, login: Login, window: Duration) -> Vec<Login> {
    let since = login.at.saturating_sub(window);
    history.retain(|l| l.at > since);
    history.push(login);
    let excess = history.len().saturating_sub(MAX_LOGINS);
    history.drain(..excess);
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(at: u64, platform: &str, country: &str, city: &str) -> Login {
        Login {
            at: Timestamp::from_millis(at),
            platform: platform.into(),
            label: String::new(),
            country: country.into(),
            city: city.into(),
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_first_login_is_never_new_and_later_ones_are_compared() {
        let first = login(1000, "Chrome on Windows", "TH", "Bangkok");
        assert_eq!(novelty(&first, &[], DAY), Novelty::default());
        let history = vec![first];
        let same = login(2000, "Chrome on Windows", "TH", "");
        assert_eq!(novelty(&same, &history, DAY), Novelty::default());
        let other = login(2000, "Firefox on Linux", "TH", "Chiang Mai");
        assert_eq!(
            novelty(&other, &history, DAY),
            Novelty {
                new_device: true,
                new_place: true
            }
        );
        let unknown = login(2000, "", "", "");
        assert_eq!(novelty(&unknown, &history, DAY), Novelty::default());
        // Outside the window nothing is remembered: nothing to compare with.
        let later = login(1000 + 86_400_000, "Firefox on Linux", "GB", "");
        assert_eq!(novelty(&later, &history, DAY), Novelty::default());
    }

    #[test]
    fn the_history_is_bounded() {
        let mut history = Vec::new();
        for i in 0..100 {
            history = remember(history, login(i, "p", "TH", ""), DAY);
        }
        assert_eq!(history.len(), MAX_LOGINS);
        assert_eq!(
            history[0].at,
            Timestamp::from_millis(100 - MAX_LOGINS as u64)
        );
    }
}
