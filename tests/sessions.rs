//! SessionService over real gRPC: every RPC, its error paths, timeouts (manual clock), the
//! per-user limit and its race, and input validation.

mod common;

use std::{collections::HashSet, time::Duration};

use common::*;
use session_authority::{
    config::Config,
    proto::v1::{self as pb},
};
use tonic::Code;

#[tokio::test]
async fn created_session_validates_with_its_device_place_and_attributes() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut req = create_request("acme", "alice");
    req.device = Some(pb::Device {
        ip: "2001:db8::1".into(),
        user_agent: "Mozilla/5.0".into(),
        device_label: "Alice's laptop".into(),
        location: Some(pb::Location {
            country: "TH".into(),
            city: "Bangkok".into(),
            latitude: Some(13.75),
            longitude: Some(100.5),
        }),
    });
    req.attributes.insert("plan".into(), "pro".into());
    let created = client
        .create_session(req.clone())
        .await
        .expect("create")
        .into_inner();
    assert!(created.token.starts_with("sat_"));
    assert!(created.evicted_session_ids.is_empty());
    let session = created.session.expect("session");
    assert_eq!(session.session_id.len(), 32);
    assert!(
        !created.token.contains(&session.session_id),
        "token is not the id in clear"
    );
    assert_eq!(session.state(), pb::SessionState::Active);
    assert_eq!(session.device, req.device);
    assert_eq!(session.attributes, req.attributes);
    assert_eq!(session.created_at, session.last_seen_at);

    let validated = validate(&mut client, &created.token).await.expect("valid");
    assert_eq!(validated.session_id, session.session_id);
    assert_eq!(validated.device, req.device);
    assert_eq!(validated.user_id, "alice");
}

#[tokio::test]
async fn session_ids_and_tokens_are_unique() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut ids = HashSet::new();
    let mut tokens = HashSet::new();
    for i in 0..200 {
        let c = create(&mut client, "t", &format!("user-{i}")).await;
        assert!(ids.insert(c.session.expect("session").session_id));
        assert!(tokens.insert(c.token));
    }
}

#[tokio::test]
async fn unknown_malformed_revoked_and_expired_tokens_get_the_same_answer() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let live = create(&mut client, "t", "u").await;

    // Malformed: wrong prefix, wrong length, bad checksum, empty.
    for bad in [
        "",
        "PHPSESSID=1234",
        "sat_abc",
        &live.token[..live.token.len() - 1],
    ] {
        assert_not_valid(validate(&mut client, bad).await);
    }
    let mut flipped = live.token.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    assert_not_valid(validate(&mut client, &String::from_utf8(flipped).expect("ascii")).await);

    // Unknown but well-formed: a token from another server's store.
    let other = TestServer::start().await;
    let foreign = create(&mut other.client().await, "t", "u").await;
    assert_not_valid(validate(&mut client, &foreign.token).await);

    // Revoked.
    let revoked = create(&mut client, "t", "u2").await;
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: revoked.session.expect("s").session_id,
            reason: 0,
        })
        .await
        .expect("revoke");
    assert_not_valid(validate(&mut client, &revoked.token).await);

    // Expired.
    server.advance(Duration::from_secs(601));
    assert_not_valid(validate(&mut client, &live.token).await);
}

#[tokio::test]
async fn rotation_keeps_the_session_and_the_old_token_lives_only_through_the_grace_period() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let id = created.session.expect("s").session_id;
    server.advance(Duration::from_secs(5));
    let rotated = client
        .rotate_session(pb::RotateSessionRequest {
            token: created.token.clone(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_ne!(rotated.token, created.token);
    let session = rotated.session.expect("s");
    assert_eq!(session.session_id, id);
    assert_eq!(session.rotation_count, 1);
    assert!(rotated.sequence > created.sequence);
    assert_eq!(
        validate(&mut client, &rotated.token)
            .await
            .expect("new token")
            .session_id,
        id
    );
    // Requests sent before the rotation still pass within the grace period (10 s by default)...
    validate(&mut client, &created.token)
        .await
        .expect("old token within the grace period");
    // ...but the old token never rotates again.
    let err = client
        .rotate_session(pb::RotateSessionRequest {
            token: created.token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("old token");
    assert_eq!(err.code(), Code::Unauthenticated);
    server.advance(Duration::from_secs(10));
    assert_not_valid(validate(&mut client, &created.token).await);
}

#[tokio::test]
async fn concurrent_rotations_of_one_token_yield_exactly_one_new_token() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = client.clone();
        let token = created.token.clone();
        tasks.push(tokio::spawn(async move {
            c.rotate_session(pb::RotateSessionRequest {
                token,
                ..Default::default()
            })
            .await
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => winners.push(r.into_inner().token),
            Err(s) => assert_eq!(s.code(), Code::Unauthenticated),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one rotation wins");
    validate(&mut client, &winners[0])
        .await
        .expect("winner's token works");
}

#[tokio::test]
async fn idle_deadline_slides_on_touch_and_not_without_it() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let a = create(&mut client, "t", "a").await;
    let b = create(&mut client, "t", "b").await;

    // 9m59s later both are alive; a is touched, b is only checked.
    server.advance(Duration::from_secs(599));
    let touched = validate(&mut client, &a.token).await.expect("a alive");
    validate_with(&mut client, &b.token, Some(false))
        .await
        .expect("b alive");
    assert_eq!(touched.last_seen_at, Some(timestamp_after(599)));
    assert_eq!(touched.idle_expires_at, Some(timestamp_after(599 + 600)));

    server.advance(Duration::from_secs(2));
    validate(&mut client, &a.token)
        .await
        .expect("a's deadline slid");
    assert_not_valid(validate(&mut client, &b.token).await);
}

#[tokio::test]
async fn absolute_deadline_ends_even_an_active_session() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let s = create(&mut client, "t", "u").await;
    for _ in 0..11 {
        server.advance(Duration::from_secs(300));
        // Keep it busy: 5-minute gaps, well inside the 10-minute idle timeout.
        if validate(&mut client, &s.token).await.is_err() {
            break;
        }
    }
    // 55 minutes in, still alive; at 60 minutes it must be dead however active.
    server.advance(Duration::from_secs(3600));
    assert_not_valid(validate(&mut client, &s.token).await);
    let session = get(&mut client, &s.session.expect("s").session_id)
        .await
        .expect("tombstone kept after the session ended");
    assert_eq!(session.state(), pb::SessionState::Expired);
    assert_eq!(session.expiry_kind(), pb::ExpiryKind::Absolute);
    assert_eq!(session.ended_at, Some(timestamp_after(3600)));
}

#[tokio::test]
async fn remember_me_sessions_get_the_longer_timeouts() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut req = create_request("t", "u");
    req.remember_me = true;
    let remembered = client
        .create_session(req)
        .await
        .expect("create")
        .into_inner();
    let plain = create(&mut client, "t", "u").await;
    let s = remembered.session.clone().expect("s");
    assert!(s.remember_me);
    assert_eq!(s.idle_expires_at, Some(timestamp_after(86_400)));
    assert_eq!(s.absolute_expires_at, Some(timestamp_after(30 * 86_400)));

    server.advance(Duration::from_secs(3 * 3600));
    validate(&mut client, &remembered.token)
        .await
        .expect("remembered survives 3h idle");
    assert_not_valid(validate(&mut client, &plain.token).await);
}

#[tokio::test]
async fn expired_validation_marks_the_session_expired_with_its_deadline() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let s = create(&mut client, "t", "u").await;
    let id = s.session.expect("s").session_id;
    server.advance(Duration::from_secs(700));
    assert_not_valid(validate(&mut client, &s.token).await);
    eventually("session recorded as expired", || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            get(&mut client, &id).await.map(|s| s.state()).ok() == Some(pb::SessionState::Expired)
        }
    })
    .await;
    let session = get(&mut client, &id).await.expect("tombstone");
    assert_eq!(session.expiry_kind(), pb::ExpiryKind::Idle);
    assert_eq!(session.ended_at, Some(timestamp_after(600)));
}

#[tokio::test]
async fn sweeper_ends_sessions_nobody_validates() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            create(&mut client, "t", &format!("u{i}"))
                .await
                .session
                .expect("s")
                .session_id,
        );
    }
    assert_eq!(list_all(&mut client, "t", "", 100).await.len(), 30);
    let keep = create(&mut client, "t", "keeper").await;
    server.advance(Duration::from_secs(500));
    validate(&mut client, &keep.token)
        .await
        .expect("keeper touched");
    server.advance(Duration::from_secs(200));
    // The listing hides dead sessions at once.
    assert_eq!(list_all(&mut client, "t", "", 100).await.len(), 1);
    // Nobody validates the 30: only the sweeper can record them as expired.
    eventually("sweeper expired all idle sessions", || {
        let mut client = client.clone();
        let ids = ids.clone();
        async move {
            for id in &ids {
                match get(&mut client, id).await {
                    Ok(s) if s.state() == pb::SessionState::Expired => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    let swept = get(&mut client, &ids[0]).await.expect("tombstone");
    assert_eq!(swept.expiry_kind(), pb::ExpiryKind::Idle);
    validate(&mut client, &keep.token)
        .await
        .expect("keeper still alive");
}

#[tokio::test]
async fn tombstones_are_purged_after_the_retention() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let s = create(&mut client, "t", "u").await;
    let id = s.session.expect("s").session_id;
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: id.clone(),
            reason: 0,
        })
        .await
        .expect("revoke");
    // Kept for 24 hours (the default tombstone_retention) after it ended.
    server.advance(Duration::from_secs(86_399));
    assert_eq!(
        get(&mut client, &id).await.expect("kept").state(),
        pb::SessionState::Revoked
    );
    server.advance(Duration::from_secs(1));
    let err = get(&mut client, &id).await.expect_err("gone at once");
    assert_eq!(err.code(), Code::NotFound);
    eventually("tombstone purged", || {
        let mut client = client.clone();
        let id = id.clone();
        async move { get(&mut client, &id).await.map_err(|e| e.code()) == Err(Code::NotFound) }
    })
    .await;
}

#[tokio::test]
async fn get_session_answers_not_found_and_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let err = get(&mut client, "00000000000000000000000000000000")
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    for bad in ["", "xyz", "ABCDEF0123456789ABCDEF0123456789"] {
        let err = get(&mut client, bad).await.expect_err("malformed");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("session_id:"),
            "{}",
            err.message()
        );
    }
}

#[tokio::test]
async fn listing_pages_are_stable_complete_and_scoped() {
    let server = TestServer::start_with(Config {
        max_sessions_per_user: 100,
        ..test_config()
    })
    .await;
    let mut client = server.client().await;
    let mut expected = Vec::new();
    for i in 0..23 {
        let user = format!("user-{}", i % 3);
        let c = create(&mut client, "acme", &user).await;
        expected.push((user, i, c.session.expect("s").session_id));
        server.advance(Duration::from_millis(5));
    }
    create(&mut client, "other-tenant", "user-0").await;
    // Ordered by user, then creation.
    expected.sort();
    let listed: Vec<String> = list_all(&mut client, "acme", "", 4)
        .await
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    let want: Vec<String> = expected.iter().map(|e| e.2.clone()).collect();
    assert_eq!(listed, want);
    let single = list_all(&mut client, "acme", "user-1", 2).await;
    assert_eq!(single.len(), 8);
    assert!(single
        .iter()
        .all(|s| s.user_id == "user-1" && s.tenant_id == "acme"));
    // Same listing twice: same order.
    let again: Vec<String> = list_all(&mut client, "acme", "", 7)
        .await
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(again, want);
}

#[tokio::test]
async fn listing_rejects_foreign_page_tokens_and_bad_sizes() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for _ in 0..3 {
        create(&mut client, "a", "u").await;
    }
    let page = client
        .list_sessions(pb::ListSessionsRequest {
            tenant_id: "a".into(),
            user_id: String::new(),
            page_size: 1,
            page_token: String::new(),
            filter: None,
        })
        .await
        .expect("list")
        .into_inner();
    assert!(!page.next_page_token.is_empty());
    let cases = [
        ("b", page.next_page_token.clone(), 1, "page_token"),
        ("a", "!!not base64!!".to_string(), 1, "page_token"),
        ("a", String::new(), 5000, "page_size"),
        ("", String::new(), 1, "tenant_id"),
    ];
    for (tenant, token, size, field) in cases {
        let err = client
            .list_sessions(pb::ListSessionsRequest {
                tenant_id: tenant.into(),
                user_id: String::new(),
                page_size: size,
                page_token: token,
                filter: None,
            })
            .await
            .expect_err("rejected");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
}

#[tokio::test]
async fn revoking_twice_is_not_an_error() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let s = create(&mut client, "t", "u").await;
    let id = s.session.expect("s").session_id;
    let request = pb::RevokeSessionRequest {
        session_id: id.clone(),
        reason: pb::RevokeReason::UserLogout as i32,
    };
    let first = client
        .revoke_session(request.clone())
        .await
        .expect("revoke")
        .into_inner();
    assert!(first.revoked);
    let session = first.session.expect("s");
    assert_eq!(session.state(), pb::SessionState::Revoked);
    assert_eq!(session.revoke_reason(), pb::RevokeReason::UserLogout);
    let second = client
        .revoke_session(request)
        .await
        .expect("again")
        .into_inner();
    assert!(!second.revoked);
    assert_eq!(second.sequence, first.sequence, "nothing new happened");
    let err = client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: "0123456789abcdef0123456789abcdef".into(),
            reason: 0,
        })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn revoke_many_is_all_or_nothing_and_reports_what_it_ended() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..4 {
        let c = create(&mut client, "t", &format!("u{i}")).await;
        ids.push(c.session.expect("s").session_id);
        tokens.push(c.token);
    }
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: ids[0].clone(),
            reason: 0,
        })
        .await
        .expect("revoke one");

    // One unknown id: NOT_FOUND and nothing revoked.
    let err = client
        .revoke_sessions(pb::RevokeSessionsRequest {
            session_ids: vec![ids[1].clone(), "ffffffffffffffffffffffffffffffff".into()],
            reason: 0,
        })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);
    validate(&mut client, &tokens[1])
        .await
        .expect("untouched by the failed call");

    let revoked = client
        .revoke_sessions(pb::RevokeSessionsRequest {
            session_ids: vec![
                ids[0].clone(),
                ids[1].clone(),
                ids[2].clone(),
                ids[2].clone(),
            ],
            reason: pb::RevokeReason::SuspiciousActivity as i32,
        })
        .await
        .expect("revoke many")
        .into_inner();
    assert_eq!(
        revoked.revoked_session_ids,
        vec![ids[1].clone(), ids[2].clone()]
    );
    assert_not_valid(validate(&mut client, &tokens[1]).await);
    assert_not_valid(validate(&mut client, &tokens[2]).await);
    validate(&mut client, &tokens[3])
        .await
        .expect("not listed, still alive");
    let s = get(&mut client, &ids[1]).await.expect("tombstone");
    assert_eq!(s.revoke_reason(), pb::RevokeReason::SuspiciousActivity);
}

#[tokio::test]
async fn log_out_everywhere_else_keeps_the_current_session() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let current = create(&mut client, "t", "alice").await;
    let other1 = create(&mut client, "t", "alice").await;
    let other2 = create(&mut client, "t", "alice").await;
    let bob = create(&mut client, "t", "bob").await;
    let current_id = current.session.clone().expect("s").session_id;
    let r = client
        .revoke_user_sessions(pb::RevokeUserSessionsRequest {
            tenant_id: "t".into(),
            user_id: "alice".into(),
            except_session_id: current_id.clone(),
            reason: 0,
        })
        .await
        .expect("revoke others")
        .into_inner();
    assert_eq!(r.revoked_session_ids.len(), 2);
    validate(&mut client, &current.token)
        .await
        .expect("current kept");
    validate(&mut client, &bob.token)
        .await
        .expect("other users untouched");
    assert_not_valid(validate(&mut client, &other1.token).await);
    assert_not_valid(validate(&mut client, &other2.token).await);
    let ended = get(&mut client, &other1.session.expect("s").session_id)
        .await
        .expect("s");
    assert_eq!(ended.revoke_reason(), pb::RevokeReason::UserLogoutOthers);

    // Without an exception: everything, reason ADMIN by default.
    let r = client
        .revoke_user_sessions(pb::RevokeUserSessionsRequest {
            tenant_id: "t".into(),
            user_id: "alice".into(),
            except_session_id: String::new(),
            reason: 0,
        })
        .await
        .expect("revoke all")
        .into_inner();
    assert_eq!(r.revoked_session_ids, vec![current_id.clone()]);
    let ended = get(&mut client, &current_id).await.expect("s");
    assert_eq!(ended.revoke_reason(), pb::RevokeReason::Admin);
}

#[tokio::test]
async fn at_the_limit_the_least_recently_used_session_is_evicted() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut sessions = Vec::new();
    for _ in 0..5 {
        sessions.push(create(&mut client, "t", "u").await);
        server.advance(Duration::from_secs(20));
    }
    // Use the oldest, so the second oldest becomes the least recently used.
    validate(&mut client, &sessions[0].token)
        .await
        .expect("touch");
    let sixth = create(&mut client, "t", "u").await;
    let second_id = sessions[1].session.clone().expect("s").session_id;
    assert_eq!(sixth.evicted_session_ids, vec![second_id.clone()]);
    assert_not_valid(validate(&mut client, &sessions[1].token).await);
    validate(&mut client, &sessions[0].token)
        .await
        .expect("recently used survives");
    let evicted = get(&mut client, &second_id).await.expect("tombstone");
    assert_eq!(evicted.revoke_reason(), pb::RevokeReason::LimitEviction);
    assert_eq!(list_all(&mut client, "t", "u", 100).await.len(), 5);
}

#[tokio::test]
async fn a_hundred_concurrent_creates_never_exceed_the_limit() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(
            async move { create(&mut c, "t", "racer").await },
        ));
    }
    let mut evicted = HashSet::new();
    let mut tokens = Vec::new();
    for t in tasks {
        let created = t.await.expect("task");
        evicted.extend(created.evicted_session_ids);
        tokens.push(created.token);
    }
    let mut client = server.client().await;
    let live = list_all(&mut client, "t", "racer", 1000).await;
    assert_eq!(live.len(), 5);
    assert_eq!(
        evicted.len(),
        95,
        "every other session was evicted exactly once"
    );
    let mut valid = 0;
    for token in &tokens {
        if validate(&mut client, token).await.is_ok() {
            valid += 1;
        }
    }
    assert_eq!(valid, 5);
}

#[tokio::test]
async fn bad_create_requests_name_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let long = "x".repeat(129);
    let mut cases: Vec<(pb::CreateSessionRequest, &str)> = vec![
        (create_request("", "u"), "tenant_id"),
        (create_request("t", ""), "user_id"),
        (create_request(&long, "u"), "tenant_id"),
        (create_request("t", "bad\u{0}id"), "user_id"),
    ];
    let with_device = |d: pb::Device| {
        let mut r = create_request("t", "u");
        r.device = Some(d);
        r
    };
    let location = |l: pb::Location| pb::Device {
        location: Some(l),
        ..Default::default()
    };
    cases.push((
        with_device(pb::Device {
            ip: "999.1.1.1".into(),
            ..Default::default()
        }),
        "device.ip",
    ));
    cases.push((
        with_device(pb::Device {
            user_agent: "u".repeat(513),
            ..Default::default()
        }),
        "device.user_agent",
    ));
    cases.push((
        with_device(location(pb::Location {
            country: "Thailand".into(),
            ..Default::default()
        })),
        "device.location.country",
    ));
    cases.push((
        with_device(location(pb::Location {
            latitude: Some(91.0),
            longitude: Some(0.0),
            ..Default::default()
        })),
        "device.location.latitude",
    ));
    cases.push((
        with_device(location(pb::Location {
            latitude: Some(f64::NAN),
            longitude: Some(0.0),
            ..Default::default()
        })),
        "device.location.latitude",
    ));
    let mut many = create_request("t", "u");
    for i in 0..17 {
        many.attributes.insert(format!("k{i}"), "v".into());
    }
    cases.push((many, "attributes"));
    let mut bad_key = create_request("t", "u");
    bad_key.attributes.insert("no spaces".into(), "v".into());
    cases.push((bad_key, "attributes"));
    for (request, field) in cases {
        let err = client.create_session(request).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // Unicode ids are fine.
    create(&mut client, "テナント", "ユーザー🙂").await;
    assert!(
        list_all(&mut client, "t", "", 10).await.is_empty(),
        "nothing bad was stored"
    );
}

#[tokio::test]
async fn bad_revoke_requests_name_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let err = client
        .revoke_sessions(pb::RevokeSessionsRequest {
            session_ids: vec![],
            reason: 0,
        })
        .await
        .expect_err("empty");
    assert!(
        err.message().starts_with("session_ids"),
        "{}",
        err.message()
    );
    let err = client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: "0123456789abcdef0123456789abcdef".into(),
            reason: pb::RevokeReason::LimitEviction as i32,
        })
        .await
        .expect_err("service-only reason");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("reason"), "{}", err.message());
    let err = client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: "0123456789abcdef0123456789abcdef".into(),
            reason: 99,
        })
        .await
        .expect_err("unknown reason");
    assert!(err.message().starts_with("reason"), "{}", err.message());
    let err = client
        .revoke_user_sessions(pb::RevokeUserSessionsRequest {
            tenant_id: "t".into(),
            user_id: "u".into(),
            except_session_id: "nope".into(),
            reason: 0,
        })
        .await
        .expect_err("bad except id");
    assert!(
        err.message().starts_with("except_session_id"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn sequences_increase_with_every_change() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let a = create(&mut client, "t", "u").await;
    let b = create(&mut client, "t", "u").await;
    assert_eq!(b.sequence, a.sequence + 1);
    let r = client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: a.session.expect("s").session_id,
            reason: 0,
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(r.sequence, b.sequence + 1);
}

#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    for service in [
        "",
        "session_authority.v1.SessionService",
        "session_authority.v1.EventService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }
}

fn timestamp_after(seconds: u64) -> prost_types::Timestamp {
    let ms = START.as_millis() + seconds * 1000;
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

#[tokio::test]
async fn validate_sessions_answers_each_token_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let a = create(&mut client, "t", "a").await;
    let b = create(&mut client, "t", "b").await;
    let revoked = create(&mut client, "t", "c").await;
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: revoked
                .session
                .as_ref()
                .expect("session")
                .session_id
                .clone(),
            reason: 0,
        })
        .await
        .expect("revoke");
    let tokens = vec![
        b.token.clone(),
        "sat_garbage".to_string(),
        a.token.clone(),
        revoked.token.clone(),
        b.token.clone(),
    ];
    let results = client
        .validate_sessions(pb::ValidateSessionsRequest {
            tokens: tokens.clone(),
            touch: Some(false),
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    let ids: Vec<Option<String>> = results
        .iter()
        .map(|r| r.session.as_ref().map(|s| s.session_id.clone()))
        .collect();
    let id =
        |c: &pb::CreateSessionResponse| Some(c.session.as_ref().expect("s").session_id.clone());
    assert_eq!(ids, vec![id(&b), None, id(&a), None, id(&b)]);
    // Debug never shows the tokens.
    let shown = format!(
        "{:?}",
        pb::ValidateSessionsRequest {
            tokens,
            touch: None
        }
    );
    assert!(
        !shown.contains(&a.token) && shown.contains("5 redacted"),
        "{shown}"
    );
    // Sizes outside 1-500 name the field.
    for n in [0, 501] {
        let err = client
            .validate_sessions(pb::ValidateSessionsRequest {
                tokens: vec![a.token.clone(); n],
                touch: None,
            })
            .await
            .expect_err("bad size");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("tokens:"), "{}", err.message());
    }
    // 500 is accepted (and fits the request size limit).
    let results = client
        .validate_sessions(pb::ValidateSessionsRequest {
            tokens: vec![a.token.clone(); 500],
            touch: None,
        })
        .await
        .expect("500 tokens")
        .into_inner()
        .results;
    assert!(results.iter().all(|r| r.session.is_some()) && results.len() == 500);
}

/// Validates run concurrently with revocations (and refill the server's session cache while
/// the writer changes sessions); once a revoke has replied, its token never validates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_never_validates_after_the_reply_under_concurrent_reads() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut created = Vec::new();
    for i in 0..60 {
        created.push(create(&mut client, "t", &format!("u{i}")).await);
    }
    let tokens: std::sync::Arc<Vec<String>> =
        std::sync::Arc::new(created.iter().map(|c| c.token.clone()).collect());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..6 {
        let (mut client, tokens, stop) = (client.clone(), tokens.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = validate(&mut client, &tokens[i % tokens.len()]).await;
                i += 1;
            }
        }));
    }
    for c in &created {
        let id = c.session.as_ref().expect("session").session_id.clone();
        client
            .revoke_session(pb::RevokeSessionRequest {
                session_id: id,
                reason: 0,
            })
            .await
            .expect("revoke");
        for _ in 0..3 {
            assert_not_valid(validate(&mut client, &c.token).await);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
}
