//! The sled backend's session cache: what makes validation as fast over a million sessions as over
//! ten thousand. New sessions are in memory from their creation (no first miss), a reopened store
//! puts its live sessions back in memory by itself, within the cache's bytes, and nothing ended
//! ever validates from memory.

#[path = "common/retention.rs"]
mod retention;

use std::{sync::Arc, time::Duration};

use session_authority::{
    clock::{Clock, ManualClock, Timestamp},
    config::Config,
    model::{
        policy::Policy,
        session::{Device, RevokeReason},
    },
    sessions::{policies::Policies, sweeper::sweep_once, NewSession, Sessions},
    store::{CacheStats, RevokeTarget, SessionStore, SledStore},
    token::TokenGenerator,
};

use retention::a_day_of_retention;

const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);

fn open(dir: &std::path::Path, cache_bytes: u64) -> Arc<Sessions<SledStore>> {
    open_with(dir, cache_bytes, Arc::new(ManualClock::new(START)))
}

fn open_with(
    dir: &std::path::Path,
    cache_bytes: u64,
    clock: Arc<ManualClock>,
) -> Arc<Sessions<SledStore>> {
    let store = Arc::new(
        SledStore::open(
            &dir.join("data"),
            8 << 20,
            cache_bytes,
            4096,
            Duration::from_secs(86_400),
        )
        .expect("open"),
    );
    let policy = Policy::from(&Config::default());
    let policies = Arc::new(Policies::load(store.clone(), policy).expect("policies"));
    Arc::new(Sessions::new(
        store,
        clock,
        TokenGenerator::from_os().expect("seed"),
        policies,
        Duration::from_secs(60),
    ))
}

fn browser(user: usize) -> NewSession {
    NewSession {
        tenant_id: "t".into(),
        user_id: format!("u{user}"),
        remember_me: false,
        device: Device {
            ip: "203.0.113.9".parse().ok(),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
                .into(),
            ..Device::default()
        },
        attributes: Default::default(),
        binding_key: None,
    }
}

fn stats(s: &Sessions<SledStore>) -> CacheStats {
    s.store().cache_stats().expect("sled has a session cache")
}

async fn warmed(s: &Sessions<SledStore>, entries: usize) -> CacheStats {
    for _ in 0..500 {
        let now = stats(s);
        if now.entries >= entries {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the cache did not warm to {entries} entries: {:?}",
        stats(s)
    );
}

async fn create(
    s: &Sessions<SledStore>,
    n: usize,
) -> Vec<(String, session_authority::token::SessionId)> {
    let mut out = Vec::new();
    for i in 0..n {
        let c = s.create(browser(i)).await.expect("create");
        out.push((c.token.expose().to_string(), c.session.id));
    }
    out
}

#[tokio::test]
async fn new_sessions_validate_from_memory_without_a_first_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), 8 << 20);
    let created = create(&s, 200).await;
    let before = stats(&s);
    assert_eq!(before.entries, 200, "written through at creation");
    for (token, id) in &created {
        let v = s.validate(token, false, None, None).await.expect("valid");
        assert_eq!(v.id, *id);
    }
    assert_eq!(
        stats(&s).misses,
        before.misses,
        "no validation read the disk"
    );
}

#[tokio::test]
async fn a_reopened_store_warms_with_its_live_sessions_and_ended_ones_stay_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let created = {
        let s = open(dir.path(), 8 << 20);
        let created = create(&s, 300).await;
        let revoked: Vec<_> = created.iter().take(30).map(|(_, id)| *id).collect();
        s.revoke(
            RevokeTarget::Sessions {
                ids: revoked,
                tenant: None,
            },
            RevokeReason::Admin,
        )
        .await
        .expect("revoke");
        assert_eq!(stats(&s).entries, 270, "ended sessions leave the cache");
        s.store().close().await.expect("close");
        created
    };
    let s = open(dir.path(), 8 << 20);
    let warm = warmed(&s, 270).await;
    assert_eq!(warm.entries, 270, "live sessions only");
    for (i, (token, _)) in created.iter().enumerate() {
        let v = s.validate(token, false, None, None).await;
        assert_eq!(v.is_ok(), i >= 30, "session {i}");
    }
    let after = stats(&s);
    // The 30 revoked ones read their tombstones from disk (and may stay, as tombstones); the live
    // ones were all in memory.
    assert_eq!(after.misses - warm.misses, 30);
}

#[tokio::test]
async fn a_cache_smaller_than_the_store_holds_its_bytes_and_every_session_still_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = 16 * 1024;
    let created = {
        let s = open(dir.path(), budget);
        let created = create(&s, 400).await;
        assert!(stats(&s).bytes <= budget as usize);
        s.store().close().await.expect("close");
        created
    };
    let s = open(dir.path(), budget);
    // Warming stops when full; give it time, then check the bound.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let warm = stats(&s);
    assert!(warm.entries > 0 && warm.entries < 400, "{warm:?}");
    assert!(warm.bytes <= budget as usize, "{warm:?}");
    for (token, _) in &created {
        s.validate(token, false, None, None).await.expect("valid");
    }
    let after = stats(&s);
    assert!(after.misses > warm.misses, "the rest came from disk");
    assert!(after.bytes <= budget as usize, "{after:?}");
}

/// `n` sessions, each validated with a touch two minutes after its creation (past
/// `touch_interval`, so each validate touches); their tokens and ids, and when they were used.
async fn used_two_minutes_later(
    s: &Sessions<SledStore>,
    clock: &ManualClock,
    n: usize,
) -> (
    Vec<(String, session_authority::token::SessionId)>,
    Timestamp,
) {
    let created = create(s, n).await;
    clock.advance(Duration::from_secs(120));
    for (token, _) in &created {
        s.validate(token, true, None, None).await.expect("valid");
    }
    (created, clock.now())
}

/// A store on a manual clock in a new directory, with `n` sessions used two minutes after their
/// creation and those touches written: the sessions, and when they were used.
async fn used_and_written(
    n: usize,
) -> (
    tempfile::TempDir,
    Arc<ManualClock>,
    Arc<Sessions<SledStore>>,
    Vec<(String, session_authority::token::SessionId)>,
    Timestamp,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let s = open_with(dir.path(), 8 << 20, clock.clone());
    let (created, used_at) = used_two_minutes_later(&s, &clock, n).await;
    touches_written(&s).await;
    (dir, clock, s, created, used_at)
}

/// Waits for the writer to have written every queued touch.
async fn touches_written(s: &Sessions<SledStore>) {
    for _ in 0..200 {
        if s.store().queued_touches() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} touches still queued", s.store().queued_touches());
}

/// Asserts that each of `sessions`, read from the store (not from the queue of touches), was last
/// used at `at`.
fn assert_last_used(
    s: &Sessions<SledStore>,
    sessions: &[(String, session_authority::token::SessionId)],
    at: Timestamp,
) {
    for (_, id) in sessions {
        let session = s.store().get(id).expect("get").expect("stored");
        assert_eq!(session.last_seen_at, at, "session {id}");
    }
}

/// Touches wait a moment to be written together (one wake-up of the writer for many); a store
/// closed in that moment writes them before it stops.
#[tokio::test]
async fn touches_not_yet_written_are_kept_by_a_clean_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let s = open_with(dir.path(), 8 << 20, clock.clone());
    let (created, used_at) = used_two_minutes_later(&s, &clock, 100).await;
    s.store().close().await.expect("close");
    drop(s);
    let s = open_with(dir.path(), 8 << 20, clock.clone());
    assert_last_used(&s, &created, used_at);
}

/// Many validates' touches are written in the background without a close, and a session read
/// back from the store (not from the queue of touches) carries its last use.
#[tokio::test]
async fn touches_are_written_in_the_background() {
    let (_dir, _clock, s, created, used_at) = used_and_written(300).await;
    assert_last_used(&s, &created, used_at);
}

/// A touch written in the background writes the last use only and leaves the deadline entry where
/// the record filed it; the writer keeps that position beside the cached record instead of
/// reading it back. With it, the sweeper that finds such a session due at its first deadline
/// files it anew, so it is due no more, and ends it at the deadline its use gave it. (Without the
/// position the entry left behind was never moved: the session stayed due at every sweep.)
#[tokio::test]
async fn a_session_touched_in_the_background_is_filed_anew_once_and_ends_at_its_last_use() {
    let (_dir, clock, s, created, used_at) = used_and_written(50).await;
    let idle = Config::default().idle_timeout;
    let retention = a_day_of_retention();
    // Past the idle deadline of the creation, before that of the use.
    clock.advance(idle - Duration::from_secs(60));
    assert_eq!(s.store().due(clock.now(), 100).expect("due").len(), 50);
    sweep_once(&s, retention, &mut Default::default())
        .await
        .expect("sweep");
    let due = s.store().due(clock.now(), 100).expect("due");
    assert!(due.is_empty(), "still due after the sweep: {due:?}");
    for (token, _) in &created {
        s.validate(token, false, None, None)
            .await
            .expect("live: used less than the idle timeout ago");
    }
    // Past the use's.
    clock.advance(Duration::from_secs(61));
    assert!(clock.now() > used_at.saturating_add(idle));
    sweep_once(&s, retention, &mut Default::default())
        .await
        .expect("sweep");
    for (token, _) in &created {
        assert!(s.validate(token, false, None, None).await.is_err());
    }
    assert!(s.store().due(clock.now(), 100).expect("due").is_empty());
}

/// Touches go into rounds of a log of last uses (`store::touch_log`). Once the rounds hold many
/// more entries than there are touched sessions, cleaning carries each session's newest entry
/// forward and drops the rest. A session used once, long before (its round cleaned since), keeps
/// that last use; one revoked since stays revoked; and so after a reopen, which reads the log back.
#[tokio::test]
async fn cleaning_the_last_use_log_keeps_every_sessions_last_use() {
    // 10 sessions used once; 150 used every minute for 28 minutes (within the idle timeout of
    // the first use), one of them revoked on the way.
    let (dir, clock, s, created, first_use) = used_and_written(160).await;
    let (cold, hot) = created.split_at(10);
    let mut written = created.len();
    for minute in 0..28 {
        clock.advance(Duration::from_secs(61));
        if minute == 10 {
            s.revoke(
                RevokeTarget::Sessions {
                    ids: vec![hot[0].1],
                    tenant: None,
                },
                RevokeReason::Admin,
            )
            .await
            .expect("revoke");
        }
        for (token, _) in &hot[1..] {
            s.validate(token, true, None, None).await.expect("valid");
        }
        written += hot.len() - 1;
        touches_written(&s).await;
    }
    let last_use = clock.now();
    let (indexed, entries) = s.store().last_use_log();
    assert_eq!(indexed, 159, "every live session used, and only those");
    assert!(
        entries + 1000 < written,
        "cleaned: {entries} of {written} entries left"
    );
    s.store().close().await.expect("close");
    drop(s);

    let s = open_with(dir.path(), 8 << 20, clock.clone());
    assert_last_used(&s, cold, first_use);
    assert_last_used(&s, &hot[1..], last_use);
    for (token, _) in cold.iter().chain(&hot[1..]) {
        s.validate(token, false, None, None).await.expect("valid");
    }
    assert!(
        s.validate(&hot[0].0, false, None, None).await.is_err(),
        "the revoked session stays revoked"
    );
}
