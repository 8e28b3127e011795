//! Defects a security review found (issue 12), each as the behaviour a user relies on: tenant
//! isolation of validate's side effects, a throttle that never refuses a valid token, policies
//! that every liveness judgement applies, and the smaller promises around them.

mod common;

use std::time::Duration;

use common::*;
use session_authority::{
    clock::{Clock, SystemClock},
    config::{Config, Role},
    proto::v1::{
        self as pb, event_service_client::EventServiceClient,
        policy_service_client::PolicyServiceClient, watch_events_response::Message,
    },
};
use tonic::Code;

const LONDON: (f64, f64) = (51.51, -0.13);
const BANGKOK: (f64, f64) = (13.76, 100.50);

fn device_at(place: (f64, f64)) -> Option<pb::Device> {
    Some(pb::Device {
        location: Some(pb::Location {
            latitude: Some(place.0),
            longitude: Some(place.1),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn tenants_config() -> Config {
    Config {
        api_keys: vec![
            api_key("ops", "admin-secret", Role::Admin, None),
            api_key("acme-web", "acme-secret", Role::Service, Some("acme")),
        ],
        // Only the validate under test may end a session early: no sweep during the test.
        sweep_interval: Duration::from_secs(3600),
        ..test_config()
    }
}

/// The first message of a stream that replays from `after` and announces when it is live: an
/// event if one was written after `after`, else the heartbeat at the head.
async fn first_after(server: &TestServer, after: u64) -> Message {
    let events =
        EventServiceClient::with_interceptor(server.channel().await, bearer("admin-secret"));
    watch_from(events, Some(after), true)
        .await
        .message()
        .await
        .expect("ok")
        .expect("open")
        .message
        .expect("message")
}

/// The first event after `after`, waiting for it if need be.
async fn next_event_after(server: &TestServer, after: u64) -> pb::SessionEvent {
    let mut stream = watch_from(
        EventServiceClient::new(server.channel().await),
        Some(after),
        false,
    )
    .await;
    loop {
        if let Some(Message::Event(e)) = stream.message().await.expect("ok").expect("open").message
        {
            return e;
        }
    }
}

#[tokio::test]
async fn a_cross_tenant_validate_changes_nothing() {
    let server = TestServer::start_with(tenants_config()).await;
    let mut ops = sessions_as(&server, "admin-secret").await;
    let mut acme = sessions_as(&server, "acme-secret").await;
    let mut policies =
        PolicyServiceClient::with_interceptor(server.channel().await, bearer("admin-secret"));
    let mut policy = policies
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "globex".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .policy
        .expect("policy");
    policy.travel_action = pb::TravelAction::Revoke as i32;
    policy.travel_max_speed_kmh = 1000.0;
    policy.travel_tolerance_km = 100.0;
    policies
        .set_policy(pb::SetPolicyRequest {
            policy: Some(policy),
            update_mask: None,
        })
        .await
        .expect("set");

    let mut request = create_request("globex", "u");
    request.device = device_at(LONDON);
    let first = ops
        .create_session(request.clone())
        .await
        .expect("create")
        .into_inner();
    let second = ops
        .create_session(request)
        .await
        .expect("create")
        .into_inner();
    let before: Vec<pb::Session> = [&first, &second]
        .iter()
        .map(|c| c.session.clone().expect("session"))
        .collect();
    let head = second.sequence;

    // Past the touch interval: a validate would now touch; Bangkok is impossible from London.
    server.advance(Duration::from_secs(60));
    let err = acme
        .validate_session(pb::ValidateSessionRequest {
            token: first.token.clone(),
            touch: Some(true),
            device: device_at(BANGKOK),
        })
        .await
        .expect_err("another tenant's token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let batch = acme
        .validate_sessions(pb::ValidateSessionsRequest {
            tokens: vec![first.token.clone(), second.token.clone()],
            touch: Some(true),
        })
        .await
        .expect("batch")
        .into_inner();
    assert!(batch.results.iter().all(|r| r.session.is_none()));

    // Past the idle deadline: a validate would now end the session and emit its event.
    server.advance(Duration::from_secs(600));
    acme.validate_session(pb::ValidateSessionRequest {
        token: second.token.clone(),
        touch: Some(true),
        device: None,
    })
    .await
    .expect_err("another tenant's token");

    for was in &before {
        let now = ops
            .get_session(pb::GetSessionRequest {
                session_id: was.session_id.clone(),
            })
            .await
            .expect("get")
            .into_inner()
            .session
            .expect("session");
        assert_eq!(now.last_seen_at, was.last_seen_at, "last seen unchanged");
        assert_eq!(now.idle_expires_at, was.idle_expires_at, "idle deadline");
        assert!(now.flags.is_empty(), "no flag");
        assert_ne!(
            now.state(),
            pb::SessionState::Revoked,
            "no revocation: {now:?}"
        );
    }
    match first_after(&server, head).await {
        Message::Heartbeat(h) => assert_eq!(h.head_sequence, head, "no event"),
        Message::Event(e) => panic!("a cross-tenant validate wrote an event: {e:?}"),
    }
}

#[tokio::test]
async fn revoking_without_tombstones_answers_the_revoked_session_and_is_audited() {
    let server = TestServer::start_with(Config {
        tombstone_retention: Duration::ZERO,
        ..test_config()
    })
    .await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let id = created.session.expect("session").session_id;
    let reply = client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: id.clone(),
            reason: pb::RevokeReason::Admin as i32,
        })
        .await
        .expect("a successful revoke answers OK")
        .into_inner();
    assert!(reply.revoked);
    let session = reply.session.expect("the session as revoked");
    assert_eq!(session.session_id, id);
    assert_eq!(session.state(), pb::SessionState::Revoked);
    assert_not_valid(validate(&mut client, &created.token).await);

    let records = session_authority::proto::v1::audit_service_client::AuditServiceClient::new(
        server.channel().await,
    )
    .list_audit_records(pb::ListAuditRecordsRequest {
        tenant_id: "t".into(),
        ..Default::default()
    })
    .await
    .expect("audit")
    .into_inner()
    .records;
    assert!(
        records
            .iter()
            .any(|r| r.action == "RevokeSession" && r.detail.contains(&id)),
        "{records:?}"
    );
}

async fn set_policy(server: &TestServer, tenant: &str, change: impl FnOnce(&mut pb::Policy)) {
    let mut policies = PolicyServiceClient::new(server.channel().await);
    let mut policy = policies
        .get_policy(pb::GetPolicyRequest {
            tenant_id: tenant.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .policy
        .expect("policy");
    change(&mut policy);
    policies
        .set_policy(pb::SetPolicyRequest {
            policy: Some(policy),
            update_mask: None,
        })
        .await
        .expect("set");
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

#[tokio::test]
async fn a_session_past_its_maximum_age_ends_at_that_age_before_and_after_the_sweep() {
    let server = TestServer::start().await;
    set_policy(&server, "t", |p| p.max_session_age = secs(60)).await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let session = created.session.expect("session");
    let max_age_at = prost_types::Timestamp {
        seconds: session.created_at.expect("created").seconds + 60,
        nanos: session.created_at.expect("created").nanos,
    };
    server.advance(Duration::from_secs(90));
    let before_sweep = get(&mut client, &session.session_id).await.expect("get");
    assert_eq!(before_sweep.state(), pb::SessionState::Revoked);
    assert_eq!(before_sweep.ended_at, Some(max_age_at));
    // The sweeper (every 20 ms here) records the ending: its event is the sign.
    next_event_after(&server, created.sequence).await;
    let after_sweep = get(&mut client, &session.session_id).await.expect("get");
    assert_eq!(after_sweep.state(), pb::SessionState::Revoked);
    assert_eq!(
        after_sweep.ended_at,
        Some(max_age_at),
        "one rule for the date"
    );
}

fn from_ip(token: &str, ip: &str) -> pb::ValidateSessionRequest {
    pb::ValidateSessionRequest {
        token: token.into(),
        touch: None,
        device: Some(pb::Device {
            ip: ip.into(),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_garbage_storm_from_one_caller_never_refuses_its_valid_tokens() {
    let server = TestServer::start_with(Config {
        api_keys: vec![api_key("web", "web-secret", Role::Service, None)],
        failed_validations_per_ip_per_minute: 5,
        failed_validations_per_caller_per_minute: 100,
        ..test_config()
    })
    .await;
    let mut web = sessions_as(&server, "web-secret").await;
    let real = web
        .create_session(create_request("t", "u"))
        .await
        .expect("create")
        .into_inner();
    let generator = session_authority::token::TokenGenerator::from_os().expect("seed");
    let garbage = || {
        generator
            .issue(&generator.session_id(SystemClock.now()))
            .token
            .expose()
            .to_string()
    };

    // Anonymous internet clients send random cookies through the web tier: 2,000 of them, each
    // from its own IP, twenty times the caller's limit.
    for i in 0..2000u32 {
        let ip = format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250);
        let err = web
            .validate_session(from_ip(&garbage(), &ip))
            .await
            .expect_err("garbage");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    // ... and in batches, which count token by token.
    let batch = web
        .validate_sessions(pb::ValidateSessionsRequest {
            tokens: (0..500).map(|_| garbage()).collect(),
            touch: None,
        })
        .await
        .expect("batch")
        .into_inner();
    assert!(batch.results.iter().all(|r| r.session.is_none()));

    // The caller's valid tokens still pass: from a fresh IP, from none, in a batch.
    web.validate_session(from_ip(&real.token, "198.51.100.1"))
        .await
        .expect("valid token from a fresh client");
    web.validate_session(pb::ValidateSessionRequest {
        token: real.token.clone(),
        touch: None,
        device: None,
    })
    .await
    .expect("valid token without a client IP");
    let batch = web
        .validate_sessions(pb::ValidateSessionsRequest {
            tokens: vec![garbage(), real.token.clone()],
            touch: None,
        })
        .await
        .expect("batch")
        .into_inner();
    assert!(batch.results[0].session.is_none());
    assert!(batch.results[1].session.is_some(), "valid token in a batch");

    // One client IP sending garbage is slowed: its invalid tokens get RESOURCE_EXHAUSTED (also
    // from another address in the same IPv6 /64), its valid ones still pass.
    let mut codes = Vec::new();
    for i in 0..8 {
        let ip = format!("2001:db8:7:7::{i}");
        let err = web
            .validate_session(from_ip(&garbage(), &ip))
            .await
            .expect_err("garbage");
        codes.push(err.code());
    }
    assert_eq!(codes[0], Code::Unauthenticated);
    assert_eq!(codes[7], Code::ResourceExhausted, "{codes:?}");
    web.validate_session(from_ip(&real.token, "2001:db8:7:7::99"))
        .await
        .expect("a valid token from a slowed client is still answered");
}

#[tokio::test]
async fn a_short_idle_timeout_never_ends_a_session_used_more_often() {
    let server = TestServer::start_with(Config {
        touch_interval: Duration::from_secs(60),
        ..test_config()
    })
    .await;
    set_policy(&server, "t", |p| p.idle_timeout = secs(60)).await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    for step in 1..=10 {
        server.advance(Duration::from_secs(50));
        validate(&mut client, &created.token)
            .await
            .unwrap_or_else(|e| panic!("used every 50 s, dead after {}s: {e:?}", step * 50));
    }
    server.advance(Duration::from_secs(61));
    assert_not_valid(validate(&mut client, &created.token).await);
}

/// A store written under a 30-minute idle timeout, reopened under a 10-minute one (a tightened
/// default policy) with one session per user at most, refusals at the limit.
async fn tightened_after_restart() -> (TestServer, pb::CreateSessionResponse) {
    let loose = Config {
        idle_timeout: Duration::from_secs(1800),
        ..test_config()
    };
    let server = TestServer::start_with(loose).await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let (dir, clock) = server.stop().await;
    let strict = Config {
        idle_timeout: Duration::from_secs(600),
        max_sessions_per_user: 1,
        limit_action: session_authority::model::policy::LimitAction::Reject,
        ..test_config()
    };
    let server = TestServer::start_in(dir, clock, strict).await;
    server.advance(Duration::from_secs(1200));
    (server, created)
}

#[tokio::test]
async fn rotation_never_revives_a_session_the_current_policy_ended() {
    let (server, created) = tightened_after_restart().await;
    let mut client = server.client().await;
    let err = client
        .rotate_session(pb::RotateSessionRequest {
            token: created.token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("idle 20 minutes under a 10-minute policy");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_not_valid(validate(&mut client, &created.token).await);
}

#[tokio::test]
async fn the_limit_counts_sessions_by_the_current_policy() {
    let (server, created) = tightened_after_restart().await;
    let mut client = server.client().await;
    let fresh = client
        .create_session(create_request("t", "u"))
        .await
        .expect("the old session is dead under the current policy, so it takes no place")
        .into_inner();
    validate(&mut client, &fresh.token).await.expect("fresh");
    let old = get(&mut client, &created.session.expect("s").session_id)
        .await
        .expect("tombstone");
    assert_eq!(old.state(), pb::SessionState::Expired);
}

async fn policy_of(server: &TestServer, tenant: &str) -> pb::GetPolicyResponse {
    PolicyServiceClient::new(server.channel().await)
        .get_policy(pb::GetPolicyRequest {
            tenant_id: tenant.into(),
        })
        .await
        .expect("get")
        .into_inner()
}

/// Keys in the store, as a backup counts them.
async fn stored_entries(server: &TestServer) -> u64 {
    let files = tempfile::tempdir().expect("tempdir");
    session_authority::backup::fetch(server.channel().await, None, &files.path().join("b"))
        .await
        .expect("backup")
}

#[tokio::test]
async fn churning_users_leave_no_records_behind() {
    let server = TestServer::start_with(Config {
        event_retention_age: Duration::from_secs(3600),
        user_state_retention: Duration::from_secs(86_400),
        audit_retention: Duration::from_secs(86_400),
        ..test_config()
    })
    .await;
    set_policy(&server, "t", |p| p.max_creations_per_day = 100).await;
    let mut client = server.client().await;
    // Settle the records that exist whatever the users do (policy, meta, the sweeper's marks).
    server.advance(Duration::from_secs(2 * 86_400));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = stored_entries(&server).await;

    for round in 0..4 {
        let mut ids = Vec::new();
        for i in 0..100 {
            let mut request = create_request("t", &format!("user-{round}-{i}"));
            request.device = device_at(LONDON);
            let created = client
                .create_session(request)
                .await
                .expect("create")
                .into_inner();
            ids.push(created.session.expect("session").session_id);
        }
        // An admin revocation: an audit record too.
        client
            .revoke_sessions(pb::RevokeSessionsRequest {
                session_ids: ids,
                reason: pb::RevokeReason::Admin as i32,
            })
            .await
            .expect("revoke");
        server.advance(Duration::from_secs(2 * 86_400));
    }
    let mut last = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        // Each backup is audited: its own record is the one extra allowed (plus the purge marks).
        last = stored_entries(&server).await;
        if last <= baseline + 3 {
            return;
        }
        server.advance(Duration::from_secs(2 * 86_400));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("400 churned users left records behind: {last} entries, {baseline} before");
}

/// Creates `n` sessions (one event each), 32 at a time.
async fn grow_log(server: &TestServer, n: usize) {
    let channel = server.channel().await;
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let mut client =
                session_authority::proto::v1::session_service_client::SessionServiceClient::new(
                    channel.clone(),
                );
            tokio::spawn(async move {
                for i in 0..n.div_ceil(32) {
                    client
                        .create_session(create_request("busy", &format!("u{t}-{i}")))
                        .await
                        .expect("create");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
}

/// On a one-thread runtime (this test's), anything that does not yield is seen at once: a
/// replay that read and skipped the whole log in one go would finish before a health check
/// that was asked for while it ran.
#[tokio::test]
async fn a_filtered_replay_of_a_long_log_leaves_the_workers_free() {
    let server = TestServer::start().await;
    grow_log(&server, 12_000).await;
    let mut events = EventServiceClient::new(server.channel().await);
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let mut replay = events
        .watch_events(pb::WatchEventsRequest {
            after_sequence: Some(0),
            filter: Some(pb::EventFilter {
                tenant_id: "quiet".into(),
                ..Default::default()
            }),
            announce_live: true,
            log_epoch: None,
        })
        .await
        .expect("watch")
        .into_inner();
    let check = health.check(tonic_health::pb::HealthCheckRequest::default());
    tokio::pin!(check);
    let caught_up = replay.message();
    tokio::pin!(caught_up);
    tokio::select! {
        biased;
        answered = &mut check => {
            answered.expect("health");
        }
        item = &mut caught_up => panic!(
            "the whole 12,000-event replay ran before a health check could be answered: {item:?}"
        ),
    }
    match caught_up.await.expect("ok").expect("open").message {
        Some(Message::Heartbeat(h)) => assert!(h.head_sequence >= 12_000),
        other => panic!("the quiet tenant has no events: {other:?}"),
    }
}

/// SetPolicy for tenant "t" taking only the fields `paths` names from `policy`.
async fn set_masked(
    server: &TestServer,
    policy: pb::Policy,
    paths: &[&str],
) -> Result<pb::Policy, tonic::Status> {
    PolicyServiceClient::new(server.channel().await)
        .set_policy(pb::SetPolicyRequest {
            policy: Some(pb::Policy {
                tenant_id: "t".into(),
                ..policy
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        })
        .await
        .map(|r| r.into_inner().policy.expect("policy"))
}

#[tokio::test]
async fn set_policy_with_an_update_mask_changes_only_the_named_fields() {
    let server = TestServer::start().await;
    let before = policy_of(&server, "t").await.policy.expect("policy");
    let given = pb::Policy {
        max_sessions_per_user: 3,
        // Not in the mask: ignored, though invalid on its own.
        idle_timeout: secs(1),
        ..Default::default()
    };
    let stored = set_masked(&server, given, &["max_sessions_per_user"])
        .await
        .expect("partial update");
    assert_eq!(stored.max_sessions_per_user, 3);
    assert_eq!(
        pb::Policy {
            max_sessions_per_user: before.max_sessions_per_user,
            ..stored.clone()
        },
        before,
        "every other field kept"
    );
    let now = policy_of(&server, "t").await;
    assert!(!now.is_default);
    assert_eq!(now.policy, Some(stored));

    let err = set_masked(&server, pb::Policy::default(), &["max_sesions_per_user"])
        .await
        .expect_err("unknown path");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("update_mask"),
        "{}",
        err.message()
    );
    // The merged policy is checked as a whole: idle longer than absolute is refused.
    let longer = pb::Policy {
        idle_timeout: secs(30 * 86_400),
        ..Default::default()
    };
    let err = set_masked(&server, longer, &["idle_timeout"])
        .await
        .expect_err("idle beyond absolute");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("timeout"), "{}", err.message());
}

#[tokio::test]
async fn one_backup_runs_at_a_time_and_each_is_complete() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    grow_log(&server, 2000).await;
    create(&mut client, "t", "u").await;
    let files = tempfile::tempdir().expect("tempdir");
    let channel = server.channel().await;
    let fetches: Vec<_> = (0..4)
        .map(|i| {
            let channel = channel.clone();
            let path = files.path().join(format!("b{i}"));
            tokio::spawn(
                async move { session_authority::backup::fetch(channel, None, &path).await },
            )
        })
        .collect();
    let mut done = 0;
    for f in fetches {
        match f.await.expect("task") {
            Ok(entries) => {
                assert!(entries > 2000);
                done += 1;
            }
            Err(e) => assert!(
                e.to_string().contains("already running"),
                "a concurrent backup is refused, not broken: {e}"
            ),
        }
    }
    assert!(done >= 1);
}

#[tokio::test]
async fn the_sweeper_ends_sessions_the_way_the_policy_in_force_does() {
    // Stored under a 30-minute idle timeout and no maximum age; reopened under a 20-minute
    // maximum age, with no enforcement run: only the sweep judges the session.
    let loose = Config {
        idle_timeout: Duration::from_secs(1800),
        ..test_config()
    };
    let server = TestServer::start_with(loose).await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let session = created.session.expect("session");
    let (dir, clock) = server.stop().await;
    let strict = Config {
        idle_timeout: Duration::from_secs(1800),
        max_session_age: Some(Duration::from_secs(1200)),
        ..test_config()
    };
    let server = TestServer::start_in(dir, clock, strict).await;
    // Past the stored idle deadline, so the sweeper picks it up.
    server.advance(Duration::from_secs(1860));
    let ended = next_event_after(&server, created.sequence).await;
    assert_eq!(ended.session_id, session.session_id);
    assert!(
        matches!(ended.body, Some(pb::session_event::Body::Revoked(ref r)) if r.reason() == pb::RevokeReason::Policy),
        "ended by the maximum age in force, not the stored idle timeout: {ended:?}"
    );
    let mut client = server.client().await;
    let stored = get(&mut client, &session.session_id)
        .await
        .expect("tombstone");
    let max_age_at = session.created_at.expect("created").seconds + 1200;
    assert_eq!(stored.ended_at.map(|t| t.seconds), Some(max_age_at));
}

#[tokio::test]
async fn a_restart_finishes_the_enforcement_of_a_policy_change() {
    // A session stored under a 30-minute idle timeout, then a policy of 5 minutes written with no
    // enforcement run (as if the process died right after the write).
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let clock = std::sync::Arc::new(session_authority::clock::ManualClock::new(START));
    let (token, sequence) = {
        let store = std::sync::Arc::new(
            session_authority::store::SledStore::open(
                &dir.path().join("data"),
                8 << 20,
                8 << 20,
                4096,
                Duration::from_secs(86_400),
            )
            .expect("open"),
        );
        let default = session_authority::model::policy::Policy::from(&Config {
            idle_timeout: Duration::from_secs(1800),
            ..test_config()
        });
        let policies = std::sync::Arc::new(
            session_authority::sessions::policies::Policies::load(store.clone(), default.clone())
                .expect("policies"),
        );
        let sessions = session_authority::sessions::Sessions::new(
            store.clone(),
            clock.clone(),
            session_authority::token::TokenGenerator::from_os().expect("seed"),
            policies.clone(),
            Duration::from_secs(10),
        );
        let created = sessions
            .create(session_authority::sessions::NewSession {
                tenant_id: "t".into(),
                user_id: "u".into(),
                remember_me: false,
                device: Default::default(),
                attributes: Default::default(),
                binding_key: None,
            })
            .await
            .expect("create");
        let mut tight = default;
        tight.idle_timeout = Duration::from_secs(300);
        policies.set("t".into(), tight).await.expect("set");
        session_authority::store::SessionStore::close(&*store)
            .await
            .expect("close");
        (created.token.expose().to_string(), created.sequence)
    };
    clock.advance(Duration::from_secs(600));
    let server = TestServer::start_in(
        dir,
        clock,
        Config {
            idle_timeout: Duration::from_secs(1800),
            ..test_config()
        },
    )
    .await;
    // Nobody validates and the session is not due by its stored deadline: only the resumed
    // enforcement ends it, and caches hear of it.
    let ended = tokio::time::timeout(Duration::from_secs(10), next_event_after(&server, sequence))
        .await
        .expect("the interrupted enforcement was resumed");
    assert!(
        matches!(ended.body, Some(pb::session_event::Body::Expired(_))),
        "{ended:?}"
    );
    let mut client = server.client().await;
    assert_not_valid(validate(&mut client, &token).await);
}
