//! PolicyService and every policy field, over real gRPC with a manual clock: timeouts, remember
//! me, the limit and its two actions under concurrency, the login quota at its edge, the maximum
//! age, tightening of open sessions, impossible travel, cookie advice.

mod common;

use std::time::Duration;

use common::*;
use session_authority::proto::v1::{
    self as pb, event_service_client::EventServiceClient,
    policy_service_client::PolicyServiceClient, session_event::Body,
    session_service_client::SessionServiceClient, watch_events_response::Message,
};
use tonic::{transport::Channel, Code};

async fn policies(server: &TestServer) -> PolicyServiceClient<Channel> {
    PolicyServiceClient::new(server.channel().await)
}

/// The tenant's current policy (the default if it has none), to modify and set.
async fn current(client: &mut PolicyServiceClient<Channel>, tenant: &str) -> pb::Policy {
    client
        .get_policy(pb::GetPolicyRequest {
            tenant_id: tenant.into(),
        })
        .await
        .expect("get policy")
        .into_inner()
        .policy
        .expect("policy")
}

async fn set(client: &mut PolicyServiceClient<Channel>, policy: pb::Policy) -> pb::Policy {
    client
        .set_policy(pb::SetPolicyRequest {
            policy: Some(policy),
            update_mask: None,
        })
        .await
        .expect("set policy")
        .into_inner()
        .policy
        .expect("policy")
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn at(lat: f64, lon: f64) -> Option<pb::Device> {
    Some(pb::Device {
        location: Some(pb::Location {
            latitude: Some(lat),
            longitude: Some(lon),
            ..Default::default()
        }),
        ..Default::default()
    })
}

const BANGKOK: (f64, f64) = (13.76, 100.50);
const LONDON: (f64, f64) = (51.51, -0.13);
const PARIS: (f64, f64) = (48.86, 2.35);

async fn create_at(
    client: &mut SessionServiceClient<Channel>,
    tenant: &str,
    user: &str,
    place: (f64, f64),
) -> Result<pb::CreateSessionResponse, tonic::Status> {
    let mut req = create_request(tenant, user);
    req.device = at(place.0, place.1);
    client.create_session(req).await.map(|r| r.into_inner())
}

async fn validate_at(
    client: &mut SessionServiceClient<Channel>,
    token: &str,
    place: (f64, f64),
) -> Result<pb::Session, tonic::Status> {
    client
        .validate_session(pb::ValidateSessionRequest {
            token: token.into(),
            touch: None,
            device: at(place.0, place.1),
        })
        .await
        .map(|r| r.into_inner().session.expect("session"))
}

#[tokio::test]
async fn policies_are_stored_listed_deleted_and_survive_a_restart() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    let default = client
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "bank".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(default.is_default);
    let mut policy = default.policy.expect("policy");
    assert_eq!(
        policy.idle_timeout,
        secs(600),
        "the default comes from configuration"
    );
    policy.max_sessions_per_user = 2;
    policy.max_creations_per_day = 10;
    policy.idle_timeout = secs(300);
    let stored = set(&mut client, policy.clone()).await;
    assert_eq!(stored.max_sessions_per_user, 2);
    for tenant in ["a-tenant", "z-tenant"] {
        let mut p = policy.clone();
        p.tenant_id = tenant.into();
        set(&mut client, p).await;
    }
    let listed = client
        .list_policies(pb::ListPoliciesRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    let names: Vec<_> = listed
        .policies
        .iter()
        .map(|p| p.tenant_id.as_str())
        .collect();
    assert_eq!(names, ["a-tenant", "bank"]);
    let rest = client
        .list_policies(pb::ListPoliciesRequest {
            page_size: 2,
            page_token: listed.next_page_token,
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(rest.policies.len(), 1);
    assert!(rest.next_page_token.is_empty());

    drop(client);
    let server = server.restart().await;
    let mut client = policies(&server).await;
    let after = client
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "bank".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(!after.is_default);
    assert_eq!(after.policy.expect("p").max_creations_per_day, 10);

    let deleted = client
        .delete_policy(pb::DeletePolicyRequest {
            tenant_id: "bank".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.deleted);
    let again = client
        .delete_policy(pb::DeletePolicyRequest {
            tenant_id: "bank".into(),
        })
        .await
        .expect("delete again")
        .into_inner();
    assert!(!again.deleted);
    assert!(current_is_default(&mut client, "bank").await);
}

async fn current_is_default(client: &mut PolicyServiceClient<Channel>, tenant: &str) -> bool {
    client
        .get_policy(pb::GetPolicyRequest {
            tenant_id: tenant.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .is_default
}

#[tokio::test]
async fn bad_policies_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    let base = current(&mut client, "t").await;
    type Change = Box<dyn Fn(&mut pb::Policy)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|p| p.idle_timeout = secs(0)),
            "policy.idle_timeout",
        ),
        (Box::new(|p| p.idle_timeout = None), "policy.idle_timeout"),
        (
            Box::new(|p| p.idle_timeout = secs(-5)),
            "policy.idle_timeout",
        ),
        (
            Box::new(|p| p.absolute_timeout = secs(60)),
            "policy.absolute_timeout",
        ),
        (
            Box::new(|p| p.remember_me_absolute_timeout = secs(400 * 86_400)),
            "policy.remember_me_absolute_timeout",
        ),
        (
            Box::new(|p| p.max_sessions_per_user = 0),
            "policy.max_sessions_per_user",
        ),
        (Box::new(|p| p.limit_action = 0), "policy.limit_action"),
        (
            Box::new(|p| p.max_creations_per_day = 20_000),
            "policy.max_creations_per_day",
        ),
        (
            Box::new(|p| p.max_session_age = secs(10)),
            "policy.max_session_age",
        ),
        (Box::new(|p| p.travel_action = 9), "policy.travel_action"),
        (
            Box::new(|p| p.travel_max_speed_kmh = 0.0),
            "policy.travel_max_speed_kmh",
        ),
        (
            Box::new(|p| p.travel_tolerance_km = f64::NAN),
            "policy.travel_tolerance_km",
        ),
        (
            Box::new(|p| p.cookie_name = "PHPSESSID".into()),
            "policy.cookie_name",
        ),
        (
            Box::new(|p| p.cookie_name = "has space".into()),
            "policy.cookie_name",
        ),
        (
            Box::new(|p| {
                p.cookie_same_site = pb::SameSite::None as i32;
                p.cookie_secure = false;
            }),
            "policy.cookie_same_site",
        ),
        (
            Box::new(|p| p.tenant_id = String::new()),
            "policy.tenant_id",
        ),
    ];
    for (change, field) in cases {
        let mut p = base.clone();
        change(&mut p);
        let err = client
            .set_policy(pb::SetPolicyRequest {
                policy: Some(p),
                update_mask: None,
            })
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    assert!(
        current_is_default(&mut client, "t").await,
        "nothing was stored"
    );
}

#[tokio::test]
async fn new_sessions_get_the_tenant_timeouts_and_remember_me_can_be_forbidden() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    let mut sessions = server.client().await;
    let mut p = current(&mut client, "strict").await;
    p.idle_timeout = secs(120);
    p.absolute_timeout = secs(900);
    p.remember_me_allowed = false;
    set(&mut client, p).await;
    let mut p = current(&mut client, "relaxed").await;
    p.remember_me_idle_timeout = secs(3 * 86_400);
    p.remember_me_absolute_timeout = secs(90 * 86_400);
    set(&mut client, p).await;

    let s = create(&mut sessions, "strict", "u").await;
    let session = s.session.clone().expect("s");
    let created = session.created_at.expect("created").seconds;
    assert_eq!(
        session.idle_expires_at.expect("idle").seconds,
        created + 120
    );
    assert_eq!(
        session.absolute_expires_at.expect("abs").seconds,
        created + 900
    );
    let mut req = create_request("strict", "u");
    req.remember_me = true;
    let err = sessions
        .create_session(req)
        .await
        .expect_err("remember me forbidden");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().starts_with("remember_me"),
        "{}",
        err.message()
    );

    let mut req = create_request("relaxed", "u");
    req.remember_me = true;
    let r = sessions
        .create_session(req)
        .await
        .expect("remember me")
        .into_inner();
    let rs = r.session.expect("s");
    let created = rs.created_at.expect("c").seconds;
    assert_eq!(rs.idle_expires_at.expect("i").seconds, created + 3 * 86_400);
    assert_eq!(
        rs.absolute_expires_at.expect("a").seconds,
        created + 90 * 86_400
    );

    server.advance(Duration::from_secs(121));
    assert_not_valid(validate(&mut sessions, &s.token).await);
    validate(&mut sessions, &r.token).await.expect("remembered");
}

#[tokio::test]
async fn a_tightened_policy_ends_open_sessions_with_their_events() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    let mut sessions = server.client().await;
    let old = create(&mut sessions, "t", "u").await;
    let old_id = old.session.clone().expect("s").session_id;
    server.advance(Duration::from_secs(390));
    validate(&mut sessions, &old.token)
        .await
        .expect("old in use");
    server.advance(Duration::from_secs(10));
    let young = create(&mut sessions, "t", "v").await;
    let mut events = EventServiceClient::new(server.channel().await)
        .watch_events(pb::WatchEventsRequest {
            announce_live: false,
            log_epoch: None,
            after_sequence: None,
            filter: None,
        })
        .await
        .expect("watch")
        .into_inner();

    // Absolute timeout from 1 h down to 5 min: `old` (400 s old, used 10 s ago) is past it,
    // `young` is not.
    let mut p = current(&mut client, "t").await;
    p.idle_timeout = secs(240);
    p.absolute_timeout = secs(300);
    set(&mut client, p).await;
    assert_not_valid(validate(&mut sessions, &old.token).await);
    let y = validate(&mut sessions, &young.token)
        .await
        .expect("young still live");
    assert_eq!(
        y.absolute_expires_at.expect("a").seconds,
        y.created_at.expect("c").seconds + 300,
        "the shorter absolute timeout applies to an open session"
    );
    // The background enforcement records the ending, with one event, without any validate.
    let event = loop {
        let item = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event in time")
            .expect("ok")
            .expect("open");
        if let Some(Message::Event(e)) = item.message {
            break e;
        }
    };
    assert_eq!(event.session_id, old_id);
    match event.body {
        Some(Body::Expired(x)) => assert_eq!(x.deadline(), pb::ExpiryKind::Absolute),
        other => panic!("expected expired, got {other:?}"),
    }
    let ended = get(&mut sessions, &old_id).await.expect("tombstone");
    assert_eq!(ended.state(), pb::SessionState::Expired);
}

#[tokio::test]
async fn sessions_older_than_the_maximum_age_are_revoked_for_policy() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    let mut sessions = server.client().await;
    let open = create(&mut sessions, "t", "u").await;
    let open_id = open.session.expect("s").session_id;
    let mut p = current(&mut client, "t").await;
    p.max_session_age = secs(1800);
    set(&mut client, p).await;
    let fresh = create(&mut sessions, "t", "v").await;
    let fresh_session = fresh.session.clone().expect("s");
    // Stay active: touch every 5 minutes, within the 10-minute idle timeout.
    for _ in 0..5 {
        server.advance(Duration::from_secs(300));
        validate(&mut sessions, &open.token).await.expect("live");
        validate(&mut sessions, &fresh.token).await.expect("live");
    }
    server.advance(Duration::from_secs(301));
    assert_not_valid(validate(&mut sessions, &open.token).await);
    assert_not_valid(validate(&mut sessions, &fresh.token).await);
    for id in [open_id, fresh_session.session_id] {
        eventually("revoked for policy", || {
            let mut sessions = sessions.clone();
            let id = id.clone();
            async move {
                get(&mut sessions, &id)
                    .await
                    .map(|s| s.revoke_reason())
                    .ok()
                    == Some(pb::RevokeReason::Policy)
            }
        })
        .await;
    }
}

#[tokio::test]
async fn at_the_limit_reject_refuses_and_evict_makes_room_under_concurrency() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    for (tenant, action) in [
        ("rejecting", pb::LimitAction::Reject),
        ("evicting", pb::LimitAction::EvictLeastRecentlyUsed),
    ] {
        let mut p = current(&mut client, tenant).await;
        p.max_sessions_per_user = 3;
        p.limit_action = action as i32;
        set(&mut client, p).await;
    }
    let sessions = server.client().await;
    for tenant in ["rejecting", "evicting"] {
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let mut c = sessions.clone();
            tasks.push(tokio::spawn(async move {
                c.create_session(create_request(tenant, "u")).await
            }));
        }
        let mut ok = 0;
        let mut exhausted = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => ok += 1,
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    assert!(s.message().starts_with("max_sessions_per_user"));
                    exhausted += 1;
                }
            }
        }
        let live = list_all(&mut sessions.clone(), tenant, "u", 100)
            .await
            .len();
        assert_eq!(live, 3, "{tenant}");
        if tenant == "rejecting" {
            assert_eq!((ok, exhausted), (3, 37));
        } else {
            assert_eq!((ok, exhausted), (40, 0));
        }
    }
}

#[tokio::test]
async fn the_login_quota_counts_a_rolling_day() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    let mut p = current(&mut client, "bank").await;
    p.max_creations_per_day = 10;
    p.max_sessions_per_user = 100;
    set(&mut client, p).await;
    let mut sessions = server.client().await;
    // Ten logins spread over the day are fine...
    for _ in 0..10 {
        create(&mut sessions, "bank", "alice").await;
        server.advance(Duration::from_secs(3600));
    }
    // ...the eleventh within 24 h of the first is not.
    let err = sessions
        .create_session(create_request("bank", "alice"))
        .await
        .expect_err("over quota");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().starts_with("max_creations_per_day"),
        "{}",
        err.message()
    );
    create(&mut sessions, "bank", "bob").await;
    create(&mut sessions, "other-tenant", "alice").await;
    // 24 h after the first login, one slot frees up, exactly one.
    server.advance(Duration::from_secs(14 * 3600));
    create(&mut sessions, "bank", "alice").await;
    let err = sessions
        .create_session(create_request("bank", "alice"))
        .await
        .expect_err("still at quota");
    assert_eq!(err.code(), Code::ResourceExhausted);
}

async fn travel_policy(server: &TestServer, tenant: &str, action: pb::TravelAction) {
    let mut client = policies(server).await;
    let mut p = current(&mut client, tenant).await;
    p.travel_action = action as i32;
    p.travel_max_speed_kmh = 1000.0;
    p.travel_tolerance_km = 100.0;
    set(&mut client, p).await;
}

#[tokio::test]
async fn bangkok_then_london_five_minutes_apart_is_flagged_london_then_paris_is_not() {
    let server = TestServer::start().await;
    travel_policy(&server, "t", pb::TravelAction::Flag).await;
    let mut sessions = server.client().await;
    let mut events = EventServiceClient::new(server.channel().await)
        .watch_events(pb::WatchEventsRequest {
            after_sequence: None,
            filter: Some(pb::EventFilter {
                event_types: vec![pb::EventType::Flagged as i32],
                ..Default::default()
            }),
            announce_live: false,
            log_epoch: None,
        })
        .await
        .expect("watch")
        .into_inner();

    let bangkok = create_at(&mut sessions, "t", "alice", BANGKOK)
        .await
        .expect("bangkok");
    server.advance(Duration::from_secs(300));
    let london = create_at(&mut sessions, "t", "alice", LONDON)
        .await
        .expect("flag, not refuse");
    let flagged = london.session.expect("s");
    assert_eq!(flagged.flags.len(), 1);
    let flag = &flagged.flags[0];
    assert!(flag.speed_kmh > 100_000.0, "{}", flag.speed_kmh);
    assert!((9_400.0..9_700.0).contains(&flag.distance_km));
    assert_eq!(flag.from_session_id, bangkok.session.expect("s").session_id);
    assert_eq!(flag.from.as_ref().and_then(|l| l.latitude), Some(BANGKOK.0));
    // Visible in the listing and as an event.
    let listed = list_all(&mut sessions, "t", "alice", 10).await;
    assert!(listed
        .iter()
        .any(|s| s.session_id == flagged.session_id && s.flags.len() == 1));
    let e = loop {
        let item = events.message().await.expect("ok").expect("open");
        if let Some(Message::Event(e)) = item.message {
            break e;
        }
    };
    assert_eq!(e.session_id, flagged.session_id);
    assert!(matches!(e.body, Some(Body::Flagged(_))));

    // London then Paris three hours later: a train ride, not a flag.
    server.advance(Duration::from_secs(3 * 3600));
    let paris = create_at(&mut sessions, "t", "alice", PARIS)
        .await
        .expect("paris");
    assert!(paris.session.expect("s").flags.is_empty());
}

#[tokio::test]
async fn missing_partial_or_nearby_places_never_trigger() {
    let server = TestServer::start().await;
    travel_policy(&server, "t", pb::TravelAction::Reject).await;
    let mut sessions = server.client().await;
    create_at(&mut sessions, "t", "u", LONDON)
        .await
        .expect("london");
    // No location, only a country and city, then 40 km away a second later.
    create(&mut sessions, "t", "u").await;
    let mut req = create_request("t", "u");
    req.device = Some(pb::Device {
        location: Some(pb::Location {
            country: "TH".into(),
            city: "Bangkok".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    sessions
        .create_session(req)
        .await
        .expect("country and city only");
    server.advance(Duration::from_secs(1));
    create_at(&mut sessions, "t", "u", (51.75, -0.45))
        .await
        .expect("nearby");
    // A different user in Bangkok: each user's places are their own.
    create_at(&mut sessions, "t", "someone-else", BANGKOK)
        .await
        .expect("other user");
}

#[tokio::test]
async fn reject_refuses_the_new_session_and_revoke_ends_the_old_one_too() {
    let server = TestServer::start().await;
    travel_policy(&server, "rejecting", pb::TravelAction::Reject).await;
    travel_policy(&server, "revoking", pb::TravelAction::Revoke).await;
    let mut sessions = server.client().await;

    let first = create_at(&mut sessions, "rejecting", "u", BANGKOK)
        .await
        .expect("first");
    server.advance(Duration::from_secs(300));
    let err = create_at(&mut sessions, "rejecting", "u", LONDON)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("impossible travel"),
        "{}",
        err.message()
    );
    validate(&mut sessions, &first.token)
        .await
        .expect("REJECT keeps the first session");

    let first = create_at(&mut sessions, "revoking", "u", BANGKOK)
        .await
        .expect("first");
    server.advance(Duration::from_secs(300));
    let err = create_at(&mut sessions, "revoking", "u", LONDON)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_not_valid(validate(&mut sessions, &first.token).await);
    let ended = get(&mut sessions, &first.session.expect("s").session_id)
        .await
        .expect("s");
    assert_eq!(ended.revoke_reason(), pb::RevokeReason::SuspiciousActivity);
}

#[tokio::test]
async fn validate_checks_the_place_too() {
    let server = TestServer::start().await;
    travel_policy(&server, "flagging", pb::TravelAction::Flag).await;
    travel_policy(&server, "revoking", pb::TravelAction::Revoke).await;
    let mut sessions = server.client().await;

    let s = create_at(&mut sessions, "flagging", "u", LONDON)
        .await
        .expect("london");
    server.advance(Duration::from_secs(60));
    validate_at(&mut sessions, &s.token, LONDON)
        .await
        .expect("same place");
    let flagged = validate_at(&mut sessions, &s.token, BANGKOK)
        .await
        .expect("flagged, live");
    assert_eq!(flagged.flags.len(), 1);
    assert_eq!(
        get(&mut sessions, &flagged.session_id)
            .await
            .expect("s")
            .flags
            .len(),
        1
    );

    let a = create_at(&mut sessions, "revoking", "u", LONDON)
        .await
        .expect("london");
    let b = create_at(&mut sessions, "revoking", "u", LONDON)
        .await
        .expect("london too");
    server.advance(Duration::from_secs(60));
    assert_not_valid(validate_at(&mut sessions, &b.token, BANGKOK).await);
    assert_not_valid(validate(&mut sessions, &b.token).await);
    assert_not_valid(validate(&mut sessions, &a.token).await);
}

#[tokio::test]
async fn cookie_advice_follows_the_policy_for_both_session_kinds() {
    let server = TestServer::start().await;
    let mut client = policies(&server).await;
    let mut sessions = server.client().await;

    let plain = create(&mut sessions, "acme", "u").await;
    let cookie = plain.cookie.expect("cookie advice");
    assert!(cookie.max_age.is_none(), "a browser-session cookie");
    assert!(cookie.secure && cookie.http_only);
    assert_eq!(cookie.same_site(), pb::SameSite::Lax);
    let generated = cookie.name.clone();
    assert_eq!(generated.len(), 16);
    for framework in [
        "PHPSESSID",
        "JSESSIONID",
        "ASP.NET_SessionId",
        "connect.sid",
    ] {
        assert!(!generated.eq_ignore_ascii_case(framework));
    }
    // Stable per tenant, different between tenants, and shown by GetPolicy.
    assert_eq!(
        create(&mut sessions, "acme", "v")
            .await
            .cookie
            .expect("c")
            .name,
        generated
    );
    assert_ne!(
        create(&mut sessions, "globex", "u")
            .await
            .cookie
            .expect("c")
            .name,
        generated
    );
    assert_eq!(current(&mut client, "acme").await.cookie_name, generated);

    let mut req = create_request("acme", "u");
    req.remember_me = true;
    let remembered = sessions
        .create_session(req)
        .await
        .expect("create")
        .into_inner();
    let cookie = remembered.cookie.expect("cookie");
    assert_eq!(cookie.max_age.expect("persistent").seconds, 86_400 * 30);

    let mut p = current(&mut client, "acme").await;
    p.cookie_name = "acme_auth".into();
    p.cookie_same_site = pb::SameSite::Strict as i32;
    set(&mut client, p).await;
    server.advance(Duration::from_secs(100));
    let rotated = sessions
        .rotate_session(pb::RotateSessionRequest {
            token: remembered.token,
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    let cookie = rotated.cookie.expect("cookie");
    assert_eq!(cookie.name, "acme_auth");
    assert_eq!(cookie.same_site(), pb::SameSite::Strict);
    assert_eq!(
        cookie.max_age.expect("persistent").seconds,
        86_400 * 30 - 100
    );
}
