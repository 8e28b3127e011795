//! A tenant's session policy as pure data and rules: what each customer decides about its users'
//! sessions (timeouts, "remember me", the per-user limit, a login quota, a maximum age, impossible
//! travel, the cookie), the bounds each field must keep, and cookie naming. No I/O: the registry
//! that stores and caches policies is `sessions::policies`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::travel::TravelRules;
use crate::error::{Error, Result};

/// What happens when a user at the session limit creates another session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LimitAction {
    EvictLeastRecentlyUsed,
    Reject,
}

/// What impossible travel triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TravelAction {
    Ignore,
    Flag,
    Revoke,
    Reject,
}

/// What a replaced token presented after the rotation grace period triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TokenReuseAction {
    #[default]
    Revoke,
    Flag,
    Ignore,
}

/// What a login from a new device or place triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum NewDeviceAction {
    None,
    #[default]
    Flag,
}

/// What a live session presented from another browser, OS or country triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DriftAction {
    #[default]
    None,
    Flag,
    Revoke,
}

/// The cookie's SameSite attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

/// A tenant's session policy. See `proto/session_authority/v1/policies.proto` for each field's
/// meaning and bounds (checked by [`Policy::validate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub absolute_timeout: Duration,
    pub remember_me_allowed: bool,
    #[serde(with = "humantime_serde")]
    pub remember_me_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub remember_me_absolute_timeout: Duration,
    pub max_sessions_per_user: u32,
    pub limit_action: LimitAction,
    /// 0: no quota.
    pub max_creations_per_day: u32,
    #[serde(with = "humantime_serde", default)]
    pub max_session_age: Option<Duration>,
    pub travel_action: TravelAction,
    pub travel_max_speed_kmh: f64,
    pub travel_tolerance_km: f64,
    /// `None`: the tenant's generated name.
    #[serde(default)]
    pub cookie_name: Option<String>,
    pub cookie_secure: bool,
    pub cookie_same_site: SameSite,
    /// Policies stored before these fields existed read as the defaults.
    #[serde(default)]
    pub token_reuse_action: TokenReuseAction,
    #[serde(with = "humantime_serde", default = "default_rotation_grace_period")]
    pub rotation_grace_period: Duration,
    #[serde(default)]
    pub new_device_action: NewDeviceAction,
    #[serde(default)]
    pub drift_action: DriftAction,
    #[serde(with = "humantime_serde", default = "default_bound_token_ttl")]
    pub bound_token_ttl: Duration,
}

pub const DEFAULT_ROTATION_GRACE_PERIOD: Duration = Duration::from_secs(10);
pub const DEFAULT_BOUND_TOKEN_TTL: Duration = Duration::from_secs(600);

fn default_rotation_grace_period() -> Duration {
    DEFAULT_ROTATION_GRACE_PERIOD
}

fn default_bound_token_ttl() -> Duration {
    DEFAULT_BOUND_TOKEN_TTL
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// Names that fingerprint a framework: refused as cookie names (compared case-insensitively).
const FRAMEWORK_COOKIE_NAMES: &[&str] = &[
    "phpsessid",
    "jsessionid",
    "asp.net_sessionid",
    "aspsessionid",
    "cfid",
    "cftoken",
    "connect.sid",
    "sessionid",
    "session",
    "session_id",
    "_session_id",
    "sid",
    "laravel_session",
    "rack.session",
    "play_session",
    "ci_session",
    "express.sid",
    "django_session",
];

fn within(field: &'static str, d: Duration, min: Duration, max: Duration) -> Result<()> {
    if d < min || d > max {
        return Err(Error::invalid(
            field,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

impl Policy {
    /// Checks every field against its documented bounds; the error names the proto field.
    pub fn validate(&self) -> Result<()> {
        within("policy.idle_timeout", self.idle_timeout, MINUTE, 30 * DAY)?;
        within(
            "policy.absolute_timeout",
            self.absolute_timeout,
            self.idle_timeout,
            365 * DAY,
        )?;
        within(
            "policy.remember_me_idle_timeout",
            self.remember_me_idle_timeout,
            MINUTE,
            365 * DAY,
        )?;
        within(
            "policy.remember_me_absolute_timeout",
            self.remember_me_absolute_timeout,
            self.remember_me_idle_timeout,
            365 * DAY,
        )?;
        if !(1..=10_000).contains(&self.max_sessions_per_user) {
            return Err(Error::invalid(
                "policy.max_sessions_per_user",
                "must be 1-10000",
            ));
        }
        if self.max_creations_per_day > 10_000 {
            return Err(Error::invalid(
                "policy.max_creations_per_day",
                "must be 0 (no quota) to 10000",
            ));
        }
        if let Some(age) = self.max_session_age {
            within("policy.max_session_age", age, MINUTE, 365 * DAY)?;
        }
        if !(100.0..=100_000.0).contains(&self.travel_max_speed_kmh) {
            return Err(Error::invalid(
                "policy.travel_max_speed_kmh",
                "must be 100-100000",
            ));
        }
        if !(0.0..=1000.0).contains(&self.travel_tolerance_km) {
            return Err(Error::invalid(
                "policy.travel_tolerance_km",
                "must be 0-1000",
            ));
        }
        if let Some(name) = &self.cookie_name {
            check_cookie_name(name)?;
        }
        within(
            "policy.rotation_grace_period",
            self.rotation_grace_period,
            Duration::ZERO,
            5 * MINUTE,
        )?;
        within("policy.bound_token_ttl", self.bound_token_ttl, MINUTE, DAY)?;
        if self.cookie_same_site == SameSite::None && !self.cookie_secure {
            return Err(Error::invalid(
                "policy.cookie_same_site",
                "NONE requires cookie_secure (browsers drop such cookies otherwise)",
            ));
        }
        Ok(())
    }

    /// Idle and absolute timeouts for a session of this kind.
    pub fn timeouts(&self, remember_me: bool) -> (Duration, Duration) {
        if remember_me {
            (
                self.remember_me_idle_timeout,
                self.remember_me_absolute_timeout,
            )
        } else {
            (self.idle_timeout, self.absolute_timeout)
        }
    }

    pub fn travel_rules(&self) -> TravelRules {
        TravelRules {
            action: self.travel_action,
            max_speed_kmh: self.travel_max_speed_kmh,
            tolerance_km: self.travel_tolerance_km,
        }
    }
}

fn check_cookie_name(name: &str) -> Result<()> {
    let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+.^_`|~-".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(token_char) {
        return Err(Error::invalid(
            "policy.cookie_name",
            "must be 1-64 cookie token characters (letters, digits, !#$%&'*+.^_`|~-)",
        ));
    }
    let lower = name.to_ascii_lowercase();
    if FRAMEWORK_COOKIE_NAMES
        .iter()
        .any(|f| lower == *f || (f.len() > 4 && lower.starts_with(f)))
    {
        return Err(Error::invalid(
            "policy.cookie_name",
            format!("{name} is a framework default that fingerprints the backend; leave it empty for a generated name"),
        ));
    }
    Ok(())
}

/// A tenant's generated cookie name: stable for the tenant, unpredictable without this
/// installation's secret, and saying nothing about the software behind it.
pub fn generated_cookie_name(secret: &[u8; 32], tenant_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"session-authority cookie name\0")
        .chain_update(secret)
        .chain_update(tenant_id.as_bytes())
        .finalize();
    // A letter first (some parsers dislike a leading digit), then 15 of [a-z0-9].
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut name = String::with_capacity(16);
    name.push(char::from(b'a' + digest[0] % 26));
    for b in &digest[1..16] {
        name.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
    }
    name
}

/// How the web tier should set the session cookie.
#[derive(Debug, Clone, PartialEq)]
pub struct CookieAdvice {
    pub name: String,
    /// `None`: a browser-session cookie.
    pub max_age: Option<Duration>,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framework_cookie_names_are_refused() {
        for bad in [
            "PHPSESSID",
            "JSESSIONID",
            "ASP.NET_SessionId",
            "connect.sid",
            "bad name",
            "",
        ] {
            assert!(check_cookie_name(bad).is_err(), "{bad}");
        }
        assert!(check_cookie_name("acme_auth").is_ok());
    }

    #[test]
    fn generated_cookie_names_are_stable_per_tenant_and_differ_between_tenants() {
        let secret = [9; 32];
        let a = generated_cookie_name(&secret, "acme");
        assert_eq!(a, generated_cookie_name(&secret, "acme"));
        assert_ne!(a, generated_cookie_name(&secret, "globex"));
        assert_ne!(a, generated_cookie_name(&[8; 32], "acme"));
        assert_eq!(a.len(), 16);
        assert!(check_cookie_name(&a).is_ok());
    }
}
