//! The Rust client's `CachedValidator` against a real server: repeats come from memory, and the
//! event stream keeps it correct through revokes, rotations, deadlines, outages and lost history.

mod common;
#[path = "common/dbsc.rs"]
mod dbsc;

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use common::*;
use session_authority::{clock::Clock, config::Config, proto::v1 as pb};
use session_authority_client::{CacheConfig, CachedValidator, Client, Eviction, EvictionCause};
use tokio::sync::broadcast;

async fn client(server: &TestServer) -> Client {
    Client::connect(&format!("http://{}", server.addr), None)
        .await
        .expect("connect")
}

/// A validator that reads the server's manual clock, so deadlines can be crossed on demand.
async fn validator(server: &TestServer, config: CacheConfig) -> CachedValidator {
    let clock = server.clock.clone();
    let v = CachedValidator::start_with_clock(
        client(server).await,
        config,
        Arc::new(move || UNIX_EPOCH + Duration::from_millis(clock.now().as_millis())),
    );
    tokio::time::timeout(Duration::from_secs(10), v.ready())
        .await
        .expect("stream live within 10 s");
    v
}

async fn next_eviction(evictions: &mut broadcast::Receiver<Eviction>) -> Eviction {
    tokio::time::timeout(Duration::from_secs(10), evictions.recv())
        .await
        .expect("an eviction within 10 s")
        .expect("eviction channel open")
}

#[tokio::test]
async fn repeats_are_answered_from_memory() {
    let server = TestServer::start().await;
    let c = client(&server).await;
    let v = validator(&server, CacheConfig::default()).await;
    let created = c.create("t", "u", false).await.expect("create");
    for _ in 0..5 {
        let s = v.validate(&created.token).await.expect("valid");
        assert_eq!(s.session_id, created.session.session_id);
    }
    let stats = v.stats();
    assert_eq!((stats.misses, stats.hits, stats.entries), (1, 4, 1));
    // Unknown tokens are never cached.
    for _ in 0..2 {
        let err = v.validate("sat_nonsense").await.expect_err("invalid");
        assert!(err.is_invalid_session(), "{err}");
    }
    assert_eq!(v.stats().misses, 3);
}

#[tokio::test]
async fn a_revoked_session_stops_validating_once_its_event_arrives() {
    let server = TestServer::start().await;
    let c = client(&server).await;
    let v = validator(&server, CacheConfig::default()).await;
    let doomed = c.create("t", "u", false).await.expect("create");
    let kept = c.create("t", "u", false).await.expect("create");
    v.validate(&doomed.token).await.expect("valid");
    v.validate(&kept.token).await.expect("valid");
    let mut evictions = v.evictions();
    let (revoked, sequence) = c
        .revoke(&doomed.session.session_id, pb::RevokeReason::Admin)
        .await
        .expect("revoke");
    assert!(revoked);
    assert_eq!(
        next_eviction(&mut evictions).await,
        Eviction::Session {
            session_id: doomed.session.session_id.clone(),
            sequence,
            cause: EvictionCause::Revoked,
            entries: 1,
        }
    );
    let err = v.validate(&doomed.token).await.expect_err("revoked");
    assert!(err.is_invalid_session(), "{err}");
    let hits = v.stats().hits;
    v.validate(&kept.token).await.expect("still valid");
    assert_eq!(
        v.stats().hits,
        hits + 1,
        "the other session is still cached"
    );
    // Logging a user out everywhere drops the rest.
    c.revoke_user("t", "u", None).await.expect("revoke user");
    next_eviction(&mut evictions).await;
    assert!(v
        .validate(&kept.token)
        .await
        .expect_err("revoked")
        .is_invalid_session());
}

#[tokio::test]
async fn rotation_drops_the_old_token_and_the_new_one_validates() {
    let server = TestServer::start().await;
    let c = client(&server).await;
    let v = validator(&server, CacheConfig::default()).await;
    let created = c.create("t", "u", false).await.expect("create");
    v.validate(&created.token).await.expect("valid");
    let mut evictions = v.evictions();
    let rotated = c
        .sessions()
        .rotate_session(pb::RotateSessionRequest {
            token: created.token.clone(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    match next_eviction(&mut evictions).await {
        Eviction::Session { cause, .. } => assert_eq!(cause, EvictionCause::Rotated),
        other => panic!("unexpected {other:?}"),
    }
    let s = v.validate(&rotated.token).await.expect("new token");
    assert_eq!(s.session_id, created.session.session_id);
    // Past the grace period the old token is refused (and its reuse revokes the session).
    server.advance(Duration::from_secs(11));
    assert!(v
        .validate(&created.token)
        .await
        .expect_err("old token")
        .is_invalid_session());
}

#[tokio::test]
async fn nothing_is_served_past_the_idle_deadline() {
    let server = TestServer::start().await;
    let c = client(&server).await;
    let v = validator(
        &server,
        CacheConfig {
            // The server's sweeper would otherwise send an expiry event; here the cache must
            // stop on its own, before any event.
            clock_margin: Duration::from_secs(1),
            max_age: Duration::from_secs(86_400),
            ..CacheConfig::default()
        },
    )
    .await;
    let created = c.create("t", "u", false).await.expect("create");
    let session = v.validate(&created.token).await.expect("valid");
    let idle = session.idle_expires_at.expect("idle deadline");
    let deadline = UNIX_EPOCH + Duration::new(idle.seconds as u64, idle.nanos as u32);
    // Just inside the margin: still served from memory.
    let now = UNIX_EPOCH + Duration::from_millis(server.clock.now().as_millis());
    let to_margin = deadline
        .duration_since(now)
        .expect("deadline ahead")
        .saturating_sub(Duration::from_millis(1500));
    server.advance(to_margin);
    let misses = v.stats().misses;
    v.validate(&created.token).await.expect("valid");
    assert_eq!(v.stats().misses, misses, "served from memory");
    // Within the margin: asks the service again (which slides the idle deadline).
    server.advance(Duration::from_millis(1000));
    let renewed = v.validate(&created.token).await.expect("valid");
    assert_eq!(v.stats().misses, misses + 1);
    assert!(renewed.idle_expires_at.expect("idle").seconds > idle.seconds);
    // Past every deadline: the service says no, whatever was cached.
    server.advance(Duration::from_secs(3600));
    assert!(v
        .validate(&created.token)
        .await
        .expect_err("expired")
        .is_invalid_session());
}

/// A device-bound token dies before its session: the cache stops serving it at the token's end.
#[tokio::test]
async fn a_bound_token_is_not_served_past_its_end() {
    let server = TestServer::start_with(Config {
        idle_timeout: Duration::from_secs(3600),
        bound_token_ttl: Duration::from_secs(120),
        ..test_config()
    })
    .await;
    let v = validator(
        &server,
        CacheConfig {
            clock_margin: Duration::from_secs(1),
            max_age: Duration::from_secs(86_400),
            ..CacheConfig::default()
        },
    )
    .await;
    let (_, jwk) = dbsc::key_pair(3);
    let created = server
        .client()
        .await
        .create_session(pb::CreateSessionRequest {
            binding_key: jwk,
            ..create_request("t", "u")
        })
        .await
        .expect("create")
        .into_inner();
    v.validate(&created.token).await.expect("valid");
    server.advance(Duration::from_secs(100));
    let misses = v.stats().misses;
    v.validate(&created.token).await.expect("valid");
    assert_eq!(
        v.stats().misses,
        misses,
        "served from memory before its end"
    );
    server.advance(Duration::from_secs(20));
    assert!(v
        .validate(&created.token)
        .await
        .expect_err("a stale bound token")
        .is_invalid_session());
    assert_eq!(v.stats().misses, misses + 1, "asked the service");
}

#[tokio::test]
async fn an_outage_makes_the_cache_miss_not_lie_then_it_resumes_where_it_stopped() {
    let server = TestServer::start().await;
    let c = client(&server).await;
    let v = validator(&server, CacheConfig::default()).await;
    let created = c.create("t", "u", false).await.expect("create");
    v.validate(&created.token).await.expect("valid");
    let cursor = v.stats().cursor;
    assert!(cursor.is_some());
    let (dir, clock) = (server.dir.clone(), server.clock.clone());
    let (addr, config) = (server.addr, server.config.clone());
    server.stop().await;
    eventually("the cache notices the outage", || async { !v.stats().live }).await;
    let err = v
        .validate(&created.token)
        .await
        .expect_err("no answers from memory during an outage");
    assert!(!err.is_invalid_session(), "{err}");
    let server = TestServer::start_at(addr, dir, clock, config).await;
    tokio::time::timeout(Duration::from_secs(15), v.ready())
        .await
        .expect("resumed");
    assert_eq!(v.stats().entries, 1, "a resumable break keeps the cache");
    let hits = v.stats().hits;
    v.validate(&created.token).await.expect("valid");
    assert_eq!(v.stats().hits, hits + 1);
    // Events after the restart still arrive.
    let mut evictions = v.evictions();
    let c = client(&server).await;
    c.revoke(&created.session.session_id, pb::RevokeReason::Admin)
        .await
        .expect("revoke");
    next_eviction(&mut evictions).await;
    assert!(v
        .validate(&created.token)
        .await
        .expect_err("revoked")
        .is_invalid_session());
}

#[tokio::test]
async fn history_lost_beyond_resuming_drops_everything() {
    let config = Config {
        event_retention_count: 5,
        ..test_config()
    };
    let server = TestServer::start_with(config).await;
    let c = client(&server).await;
    let v = validator(
        &server,
        CacheConfig {
            // Long enough to prune the log while the cache is away.
            reconnect_delay: Duration::from_secs(4),
            ..CacheConfig::default()
        },
    )
    .await;
    let created = c.create("t", "u", false).await.expect("create");
    v.validate(&created.token).await.expect("valid");
    let mut evictions = v.evictions();
    let server = server.restart_on_same_port().await;
    let c = client(&server).await;
    let mut head = 0;
    for i in 0..20 {
        head = c
            .create("t", &format!("other{i}"), false)
            .await
            .expect("create")
            .sequence;
    }
    // Wait for the sweeper to prune the log past the cache's cursor.
    let mut events = c.events();
    eventually("log pruned", || {
        let mut events = events.clone();
        async move {
            events
                .watch_events(pb::WatchEventsRequest {
                    after_sequence: Some(head - 10),
                    filter: None,
                    announce_live: false,
                    log_epoch: None,
                })
                .await
                .is_err()
        }
    })
    .await;
    let _ = &mut events;
    assert_eq!(
        next_eviction(&mut evictions).await,
        Eviction::All { entries: 1 }
    );
    tokio::time::timeout(Duration::from_secs(15), v.ready())
        .await
        .expect("live again from the head");
    assert_eq!(v.stats().entries, 0);
    v.validate(&created.token)
        .await
        .expect("still valid, from the service");
    assert_eq!(v.stats().entries, 1);
}
