//! Throttling of failed validations: slows and surfaces abuse, never refuses a valid token.
//!
//! Tokens carry 256-bit secrets, so guessing one is hopeless however fast anyone asks; what
//! failed validations do tell is that some client is sending garbage (a scanner, a broken app,
//! cookies of another site). The throttle turns that into signals without ever becoming the
//! outage itself:
//! - **Per client IP** (as given in the request's `device.ip`; IPv6 counted per /64, the block a
//!   single host or home usually holds): beyond `failed_validations_per_ip_per_minute` that IP
//!   is *blocked* for a while. A blocked IP's invalid tokens get RESOURCE_EXHAUSTED instead of
//!   UNAUTHENTICATED, which tells the web tier to slow that client down; its valid tokens are
//!   still answered, since an IP is often shared (NAT, proxies) with legitimate users.
//! - **Per caller** (the calling service): beyond `failed_validations_per_caller_per_minute` the
//!   caller is reported, as a metric and a warn line at most once a minute, never refused. A
//!   caller is a whole web tier: blocking it would let anonymous garbage log everyone out.
//!
//! Every invalid token counts, one by one, in ValidateSession, ValidateSessions and
//! RotateSession. Log lines carry a salted hash of the last token tried, never the token.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use governor::{
    clock::{Clock, DefaultClock},
    DefaultKeyedRateLimiter, Quota, RateLimiter,
};
use sha2::{Digest, Sha256};

/// How often (in failures) the throttle forgets keys that have been quiet, to bound memory.
const HOUSEKEEPING_EVERY: u64 = 4096;
/// A caller over its limit is reported at most this often.
const CALLER_REPORT_EVERY: Duration = Duration::from_secs(60);

/// What the throttle keeps about keys over their limits.
#[derive(Default)]
struct OverLimit {
    /// Client IP blocks (IPv6 as its /64) and until when.
    ips: HashMap<IpAddr, Instant>,
    /// When each caller over its limit was last reported.
    callers_reported: HashMap<String, Instant>,
}

/// See the module documentation.
pub struct FailureThrottle {
    per_caller: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    over: Mutex<OverLimit>,
    /// Whether any IP may be blocked: lets [`FailureThrottle::ip_blocked`] skip the lock in the
    /// normal case.
    any_blocked: AtomicBool,
    salt: [u8; 16],
    failures: AtomicU64,
}

fn quota(per_minute: u32) -> Quota {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(n)
}

/// The key an IP is counted under: IPv4 as itself, IPv6 by its /64 (one host can pick any
/// address in its /64, so counting addresses would count nothing).
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

impl FailureThrottle {
    pub fn new(per_ip_per_minute: u32, per_caller_per_minute: u32) -> Self {
        let mut salt = [0u8; 16];
        // Only for log correlation; a fixed salt would still hide tokens.
        let _ = getrandom::fill(&mut salt);
        Self {
            per_caller: RateLimiter::keyed(quota(per_caller_per_minute)),
            per_ip: RateLimiter::keyed(quota(per_ip_per_minute)),
            over: Mutex::new(OverLimit::default()),
            any_blocked: AtomicBool::new(false),
            salt,
            failures: AtomicU64::new(0),
        }
    }

    fn over(&self) -> std::sync::MutexGuard<'_, OverLimit> {
        self.over.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the client at `ip` is over its limit of failed validations: its invalid tokens
    /// then get RESOURCE_EXHAUSTED (its valid ones are answered as usual).
    pub fn ip_blocked(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip else { return false };
        if !self.any_blocked.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        self.over()
            .ips
            .get(&ip_key(ip))
            .is_some_and(|until| *until > now)
    }

    /// Counts one failed validation of `token` by `caller`, from the client at `ip` if known.
    pub fn record_failure(&self, caller: &str, ip: Option<IpAddr>, token: &str) {
        crate::metrics::failed_validation(caller);
        let clock = DefaultClock::default();
        if self.per_caller.check_key(&caller.to_string()).is_err() {
            self.report_caller(caller, token);
        }
        if let Some(ip) = ip.map(ip_key) {
            if let Err(wait) = self.per_ip.check_key(&ip) {
                self.block_ip(ip, wait.wait_time_from(clock.now()), token);
            }
        }
        if self.failures.fetch_add(1, Ordering::Relaxed) % HOUSEKEEPING_EVERY
            == HOUSEKEEPING_EVERY - 1
        {
            self.housekeeping();
        }
    }

    fn token_digest(&self, token: &str) -> String {
        let digest = Sha256::new()
            .chain_update(self.salt)
            .chain_update(token.as_bytes())
            .finalize();
        hex::encode(&digest[..8])
    }

    /// A caller over its limit: a metric every time, a log line at most once a minute.
    fn report_caller(&self, caller: &str, token: &str) {
        crate::metrics::failed_validations_over_limit(caller);
        let now = Instant::now();
        let mut over = self.over();
        let due = over
            .callers_reported
            .get(caller)
            .is_none_or(|at| now.duration_since(*at) >= CALLER_REPORT_EVERY);
        if due {
            over.callers_reported.insert(caller.to_string(), now);
            drop(over);
            tracing::warn!(
                caller,
                last_token_salted_sha256 = %self.token_digest(token),
                "failed validations from this caller are over its limit (garbage cookies, a \
                 broken client or a scan); valid tokens are still answered"
            );
        }
    }

    fn block_ip(&self, ip: IpAddr, wait: Duration, token: &str) {
        let now = Instant::now();
        // Block for at least a second, so a burst is one event, not one per refilled token.
        let until = now + wait.max(Duration::from_secs(1));
        let mut over = self.over();
        let was_blocked = over.ips.get(&ip).is_some_and(|u| *u > now);
        over.ips.insert(ip, until);
        self.any_blocked.store(true, Ordering::Release);
        drop(over);
        if !was_blocked {
            tracing::warn!(
                client_ip = %ip,
                blocked_for_ms = (until - now).as_millis() as u64,
                last_token_salted_sha256 = %self.token_digest(token),
                "failed validations from this client over the limit: its invalid tokens get \
                 RESOURCE_EXHAUSTED (possible token guessing)"
            );
        }
    }

    fn housekeeping(&self) {
        let now = Instant::now();
        let mut over = self.over();
        over.ips.retain(|_, until| *until > now);
        over.callers_reported
            .retain(|_, at| now.duration_since(*at) < CALLER_REPORT_EVERY);
        if over.ips.is_empty() {
            self.any_blocked.store(false, Ordering::Release);
        }
        drop(over);
        self.per_caller.retain_recent();
        self.per_ip.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_blocks_its_ip_but_not_another() {
        let throttle = FailureThrottle::new(5, 1000);
        let attacker: IpAddr = "192.0.2.1".parse().expect("ip");
        let user: IpAddr = "198.51.100.1".parse().expect("ip");
        for _ in 0..5 {
            assert!(!throttle.ip_blocked(Some(attacker)), "within burst");
            throttle.record_failure("web", Some(attacker), "sat_guess");
        }
        throttle.record_failure("web", Some(attacker), "sat_guess");
        assert!(throttle.ip_blocked(Some(attacker)));
        assert!(!throttle.ip_blocked(Some(user)), "other clients unaffected");
        assert!(!throttle.ip_blocked(None));
    }

    #[test]
    fn ipv6_addresses_count_by_their_slash_64() {
        let throttle = FailureThrottle::new(3, 1000);
        for i in 0..4u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i));
            throttle.record_failure("web", Some(ip), "sat_guess");
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::1".parse().expect("ip");
        let next_64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(throttle.ip_blocked(Some(same_64)));
        assert!(!throttle.ip_blocked(Some(next_64)));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        assert_eq!(ip_key(mapped), "192.0.2.1".parse::<IpAddr>().expect("ip"));
    }
}
