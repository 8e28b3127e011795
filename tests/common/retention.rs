//! What the sweeper keeps in tests that sweep: included by path by the suites that need only this.

use std::time::Duration;

use session_authority::sessions::Retention;

/// A day of everything, longer than any test runs.
pub fn a_day_of_retention() -> Retention {
    let day = Duration::from_secs(86_400);
    Retention {
        age: day,
        count: 1_000_000,
        user_state: day,
        audit: day,
        audit_count: 1_000_000,
        user_state_count: 1_000_000,
    }
}
