//! Throttling of failed validations, against token guessing.
//!
//! Every failed validation (or rotation) spends a token from two buckets: the calling
//! service's and the client IP's (as given in the request's device). When either bucket is
//! empty, that key is blocked until the bucket refills: its validations get RESOURCE_EXHAUSTED
//! *before* any lookup, so a guesser learns nothing more, however fast it asks. Successful
//! validations spend nothing, so legitimate traffic is unaffected. A key that becomes blocked
//! is logged once at warn, with a salted hash of the last token it tried, never the token.

use std::{
    collections::HashMap,
    net::IpAddr,
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

use crate::error::Error;

/// How often (in failures) the throttle forgets keys that have been quiet, to bound memory.
const HOUSEKEEPING_EVERY: u64 = 4096;

/// Who is blocked, until when.
#[derive(Default)]
struct Blocked {
    callers: HashMap<String, Instant>,
    ips: HashMap<IpAddr, Instant>,
}

/// See the module documentation.
pub struct FailureThrottle {
    per_caller: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<Blocked>,
    /// Whether anything may be blocked: lets [`FailureThrottle::check`], which every validate
    /// calls, skip the lock entirely in the normal case.
    any_blocked: AtomicBool,
    salt: [u8; 16],
    failures: AtomicU64,
}

fn quota(per_minute: u32) -> Quota {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(n)
}

impl FailureThrottle {
    pub fn new(per_ip_per_minute: u32, per_caller_per_minute: u32) -> Self {
        let mut salt = [0u8; 16];
        // Only for log correlation; a fixed salt would still hide tokens.
        let _ = getrandom::fill(&mut salt);
        Self {
            per_caller: RateLimiter::keyed(quota(per_caller_per_minute)),
            per_ip: RateLimiter::keyed(quota(per_ip_per_minute)),
            blocked: Mutex::new(Blocked::default()),
            any_blocked: AtomicBool::new(false),
            salt,
            failures: AtomicU64::new(0),
        }
    }

    fn blocked(&self) -> std::sync::MutexGuard<'_, Blocked> {
        self.blocked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses the call if its caller or client IP is blocked.
    pub fn check(&self, caller: &str, ip: Option<IpAddr>) -> Result<(), Error> {
        if !self.any_blocked.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = Instant::now();
        let blocked = self.blocked();
        let caller_blocked = blocked.callers.get(caller).is_some_and(|u| *u > now);
        let ip_blocked = ip.is_some_and(|ip| blocked.ips.get(&ip).is_some_and(|u| *u > now));
        if caller_blocked || ip_blocked {
            return Err(Error::ResourceExhausted(
                "too many failed validations from this caller or client; retry later".into(),
            ));
        }
        Ok(())
    }

    /// Counts a failed validation of `token`.
    pub fn record_failure(&self, caller: &str, ip: Option<IpAddr>, token: &str) {
        let clock = DefaultClock::default();
        if let Err(wait) = self.per_caller.check_key(&caller.to_string()) {
            let wait = wait.wait_time_from(clock.now());
            self.block(|b| &mut b.callers, caller.to_string(), wait, token);
        }
        if let Some(ip) = ip {
            if let Err(wait) = self.per_ip.check_key(&ip) {
                let wait = wait.wait_time_from(clock.now());
                self.block(|b| &mut b.ips, ip, wait, token);
            }
        }
        if self.failures.fetch_add(1, Ordering::Relaxed) % HOUSEKEEPING_EVERY
            == HOUSEKEEPING_EVERY - 1
        {
            self.housekeeping();
        }
    }

    fn block<K: std::hash::Hash + Eq + std::fmt::Debug>(
        &self,
        map: impl FnOnce(&mut Blocked) -> &mut HashMap<K, Instant>,
        key: K,
        wait: Duration,
        token: &str,
    ) {
        let now = Instant::now();
        // Block for at least a second, so a burst is one event, not one per refilled token.
        let until = now + wait.max(Duration::from_secs(1));
        let mut blocked = self.blocked();
        let map = map(&mut blocked);
        let was_blocked = map.get(&key).is_some_and(|u| *u > now);
        if !was_blocked {
            let digest = Sha256::new()
                .chain_update(self.salt)
                .chain_update(token.as_bytes())
                .finalize();
            tracing::warn!(
                key = ?key,
                blocked_for_ms = (until - now).as_millis() as u64,
                last_token_salted_sha256 = %hex::encode(&digest[..8]),
                "failed validations over the limit: throttling (possible token guessing)"
            );
        }
        map.insert(key, until);
        self.any_blocked.store(true, Ordering::Release);
    }

    fn housekeeping(&self) {
        let now = Instant::now();
        let mut blocked = self.blocked();
        blocked.callers.retain(|_, until| *until > now);
        blocked.ips.retain(|_, until| *until > now);
        if blocked.callers.is_empty() && blocked.ips.is_empty() {
            self.any_blocked.store(false, Ordering::Release);
        }
        drop(blocked);
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
            throttle.check("web", Some(attacker)).expect("within burst");
            throttle.record_failure("web", Some(attacker), "sat_guess");
        }
        throttle.record_failure("web", Some(attacker), "sat_guess");
        assert!(throttle.check("web", Some(attacker)).is_err());
        throttle
            .check("web", Some(user))
            .expect("other clients unaffected");
    }
}
