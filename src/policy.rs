//! Per-tenant session policy: what each customer decides about its users' sessions (timeouts,
//! "remember me", the per-user limit, a login quota, a maximum age, impossible travel, the cookie).
//!
//! Policies are stored durably by the store and cached here in memory: every create and validate
//! reads one, so a read is a map lookup. A tenant without a policy follows the default built from
//! [`Config`]. Also here, as pure functions: the impossible-travel check and cookie naming. No
//! gRPC, no sled.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    clock::Timestamp,
    config::Config,
    error::{Error, Result},
    sessions::model::Location,
    store::SessionStore,
    token::SessionId,
};

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

impl From<&Config> for Policy {
    fn from(c: &Config) -> Self {
        Self {
            idle_timeout: c.idle_timeout,
            absolute_timeout: c.absolute_timeout,
            remember_me_allowed: c.remember_me_allowed,
            remember_me_idle_timeout: c.remember_me_idle_timeout,
            remember_me_absolute_timeout: c.remember_me_absolute_timeout,
            max_sessions_per_user: c.max_sessions_per_user,
            limit_action: c.limit_action,
            max_creations_per_day: c.max_creations_per_day,
            max_session_age: c.max_session_age,
            travel_action: c.travel_action,
            travel_max_speed_kmh: c.travel_max_speed_kmh,
            travel_tolerance_km: c.travel_tolerance_km,
            cookie_name: None,
            cookie_secure: c.cookie_secure,
            cookie_same_site: c.cookie_same_site,
        }
    }
}

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

// === impossible travel ===

/// The travel settings of a policy, as the store needs them inside a write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TravelRules {
    pub action: TravelAction,
    pub max_speed_kmh: f64,
    pub tolerance_km: f64,
}

/// A user's last known place.
#[derive(Debug, Clone, PartialEq)]
pub struct LastSeen {
    pub location: Location,
    pub at: Timestamp,
    pub session_id: SessionId,
}

/// Impossible travel seen on a session.
#[derive(Debug, Clone, PartialEq)]
pub struct TravelFlag {
    pub flagged_at: Timestamp,
    pub from: Location,
    pub from_seen_at: Timestamp,
    pub from_session_id: Option<SessionId>,
    pub to: Location,
    pub distance_km: f64,
    pub speed_kmh: f64,
}

const EARTH_RADIUS_KM: f64 = 6371.0;

/// Great-circle distance (haversine) between two (latitude, longitude) points in degrees.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// Whether getting from `previous` to `here` at `now` needs an impossible speed. Places without
/// coordinates never trigger it; neither do places within the tolerance of each other.
pub fn impossible_travel(
    previous: &LastSeen,
    here: &Location,
    now: Timestamp,
    rules: &TravelRules,
) -> Option<TravelFlag> {
    if rules.action == TravelAction::Ignore {
        return None;
    }
    let (from, to) = (previous.location.coordinates?, here.coordinates?);
    let distance = distance_km(from, to);
    if distance <= rules.tolerance_km {
        return None;
    }
    let hours = now.since(previous.at).as_secs_f64() / 3600.0;
    let speed = if hours > 0.0 {
        distance / hours
    } else {
        f64::INFINITY
    };
    (speed > rules.max_speed_kmh).then(|| TravelFlag {
        flagged_at: now,
        from: previous.location.clone(),
        from_seen_at: previous.at,
        from_session_id: Some(previous.session_id),
        to: here.clone(),
        distance_km: distance,
        // An instant jump has no finite speed; report it as the largest finite one.
        speed_kmh: speed.min(f64::MAX),
    })
}

// === the policy registry ===

/// Every tenant's policy, cached over the store.
pub struct Policies<S> {
    store: Arc<S>,
    default: Arc<Policy>,
    tenants: RwLock<BTreeMap<String, Arc<Policy>>>,
    /// Held from a policy's durable write until the map shows it, so that concurrent writes
    /// reach the map in the order they reached the store (memory and disk never disagree).
    writes: tokio::sync::Mutex<()>,
}

impl<S: SessionStore> Policies<S> {
    /// Loads every stored policy.
    pub fn load(store: Arc<S>, default: Policy) -> Result<Self> {
        let tenants = store
            .policies()?
            .into_iter()
            .map(|(t, p)| (t, Arc::new(p)))
            .collect();
        Ok(Self {
            store,
            default: Arc::new(default),
            tenants: RwLock::new(tenants),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Policy>>> {
        // Entries are replaced whole, so a panic elsewhere cannot leave the map half-written.
        self.tenants.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy `tenant_id` follows, and whether it is the default.
    pub fn get(&self, tenant_id: &str) -> (Arc<Policy>, bool) {
        match self.read().get(tenant_id) {
            Some(p) => (p.clone(), false),
            None => (self.default.clone(), true),
        }
    }

    pub fn for_tenant(&self, tenant_id: &str) -> Arc<Policy> {
        self.get(tenant_id).0
    }

    /// Stores a tenant's policy (durably) and puts it in force.
    pub async fn set(&self, tenant_id: String, policy: Policy) -> Result<Arc<Policy>> {
        self.update(tenant_id, |_| Ok(policy)).await
    }

    /// Stores the policy `change` makes of the tenant's current one (its own or the default),
    /// with no other policy write in between, and puts it in force.
    pub async fn update(
        &self,
        tenant_id: String,
        change: impl FnOnce(&Policy) -> Result<Policy>,
    ) -> Result<Arc<Policy>> {
        let _serial = self.writes.lock().await;
        let policy = change(&self.for_tenant(&tenant_id))?;
        policy.validate()?;
        self.store
            .put_policy(tenant_id.clone(), Some(policy.clone()))
            .await?;
        let policy = Arc::new(policy);
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant_id, policy.clone());
        Ok(policy)
    }

    /// Deletes a tenant's policy; true if it had one.
    pub async fn delete(&self, tenant_id: &str) -> Result<bool> {
        let _serial = self.writes.lock().await;
        let existed = self.store.put_policy(tenant_id.to_string(), None).await?;
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant_id);
        Ok(existed)
    }

    /// Tenants with a policy of their own, after `after`, at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Vec<(String, Arc<Policy>)> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.read()
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect()
    }

    /// The cookie name for a tenant: the policy's, or the tenant's generated one.
    pub fn cookie_name(&self, tenant_id: &str, policy: &Policy) -> String {
        policy
            .cookie_name
            .clone()
            .unwrap_or_else(|| generated_cookie_name(&self.store.installation_secret(), tenant_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lon: f64) -> Location {
        Location {
            coordinates: Some((lat, lon)),
            ..Location::default()
        }
    }

    fn rules() -> TravelRules {
        TravelRules {
            action: TravelAction::Flag,
            max_speed_kmh: 1000.0,
            tolerance_km: 100.0,
        }
    }

    const MIN: u64 = 60_000;

    #[test]
    fn bangkok_then_london_five_minutes_later_is_impossible() {
        let bangkok = LastSeen {
            location: at(13.76, 100.50),
            at: Timestamp::from_millis(0),
            session_id: SessionId::from_bytes([1; 16]),
        };
        let flag = impossible_travel(
            &bangkok,
            &at(51.51, -0.13),
            Timestamp::from_millis(5 * MIN),
            &rules(),
        )
        .expect("flagged");
        assert!(
            (9_400.0..9_700.0).contains(&flag.distance_km),
            "{}",
            flag.distance_km
        );
        assert!(flag.speed_kmh > 100_000.0);
    }

    #[test]
    fn london_then_paris_three_hours_later_is_possible() {
        let london = LastSeen {
            location: at(51.51, -0.13),
            at: Timestamp::from_millis(0),
            session_id: SessionId::from_bytes([1; 16]),
        };
        let paris = at(48.86, 2.35);
        assert!((330.0..360.0).contains(&distance_km((51.51, -0.13), (48.86, 2.35))));
        assert!(
            impossible_travel(&london, &paris, Timestamp::from_millis(180 * MIN), &rules())
                .is_none()
        );
    }

    #[test]
    fn nearby_points_and_missing_coordinates_never_trigger() {
        let here = LastSeen {
            location: at(51.51, -0.13),
            at: Timestamp::from_millis(0),
            session_id: SessionId::from_bytes([1; 16]),
        };
        // 40 km away at the same instant: geolocation noise.
        assert!(impossible_travel(
            &here,
            &at(51.75, -0.45),
            Timestamp::from_millis(0),
            &rules()
        )
        .is_none());
        let no_coordinates = Location {
            country: "TH".into(),
            city: "Bangkok".into(),
            coordinates: None,
        };
        assert!(
            impossible_travel(&here, &no_coordinates, Timestamp::from_millis(1), &rules())
                .is_none()
        );
        let ignore = TravelRules {
            action: TravelAction::Ignore,
            ..rules()
        };
        assert!(
            impossible_travel(&here, &at(13.76, 100.5), Timestamp::from_millis(1), &ignore)
                .is_none()
        );
    }

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
