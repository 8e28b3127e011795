//! Hijacking defences over real gRPC with a manual clock: stolen-token detection by rotation
//! reuse (and that it is no oracle), and their policy fields.

mod common;

use std::time::{Duration, Instant};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use common::*;
use session_authority::proto::v1::{self as pb, policy_service_client::PolicyServiceClient};
use tonic::{transport::Channel, Code};

async fn policies(server: &TestServer) -> PolicyServiceClient<Channel> {
    PolicyServiceClient::new(server.channel().await)
}

/// Sets the named fields of `tenant`'s policy.
async fn update(
    server: &TestServer,
    tenant: &str,
    policy: pb::Policy,
    paths: &[&str],
) -> Result<pb::Policy, tonic::Status> {
    policies(server)
        .await
        .set_policy(pb::SetPolicyRequest {
            policy: Some(pb::Policy {
                tenant_id: tenant.into(),
                ..policy
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        })
        .await
        .map(|r| r.into_inner().policy.expect("policy"))
}

/// A token of session `of` with another secret: well formed, checksum right, not the session's.
fn forged_for(of: &str) -> String {
    let mut raw = URL_SAFE_NO_PAD
        .decode(of.strip_prefix("sat_").expect("prefix"))
        .expect("base64");
    let n = raw.len();
    for b in &mut raw[16..n - 4] {
        *b ^= 0x5a;
    }
    let crc = crc32fast::hash(&raw[..n - 4]).to_be_bytes();
    raw[n - 4..].copy_from_slice(&crc);
    format!("sat_{}", URL_SAFE_NO_PAD.encode(raw))
}

async fn rotate(
    client: &mut SessionServiceClientChannel,
    token: &str,
) -> pb::RotateSessionResponse {
    client
        .rotate_session(pb::RotateSessionRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner()
}

type SessionServiceClientChannel =
    pb::session_service_client::SessionServiceClient<tonic::transport::Channel>;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn a_reused_token_revokes_its_session_and_says_which_rotation_it_came_from() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let id = created.session.expect("s").session_id;
    server.advance(Duration::from_secs(1));
    let rotated = rotate(&mut client, &created.token).await;
    // Within the default 10 s grace period the page's in-flight requests still pass.
    server.advance(Duration::from_secs(9));
    validate(&mut client, &created.token)
        .await
        .expect("within the grace period");
    server.advance(Duration::from_secs(2));
    assert_not_valid(validate(&mut client, &created.token).await);
    let mut session = get(&mut client, &id).await.expect("get");
    for _ in 0..300 {
        if session.state() != pb::SessionState::Active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        session = get(&mut client, &id).await.expect("get");
    }
    assert_eq!(session.state(), pb::SessionState::Revoked);
    assert_eq!(session.revoke_reason(), pb::RevokeReason::TokenReuse);
    let flag = &session.security_flags[0];
    assert_eq!(flag.kind(), pb::FlagKind::TokenReuse);
    assert_eq!(flag.reused_rotation, 1);
    assert_eq!(
        flag.reused_replaced_at.as_ref().map(|t| t.seconds),
        Some(START.as_millis() as i64 / 1000 + 1)
    );
    assert!(
        session.flags.is_empty(),
        "`flags` keeps impossible travel only"
    );
    assert_not_valid(validate(&mut client, &rotated.token).await);

    // Callers cannot claim the reason for themselves.
    let other = create(&mut client, "t", "v").await;
    let err = client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: other.session.expect("s").session_id,
            reason: pb::RevokeReason::TokenReuse as i32,
        })
        .await
        .expect_err("the service's own reason");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("reason:"), "{}", err.message());
}

/// The answer to a reused token is the one any invalid token gets, in status, message and time:
/// the reuse is acted on after the answer.
#[tokio::test]
async fn a_reused_token_is_answered_like_an_unknown_one() {
    reuse_is_no_oracle(|mut client, token| async move {
        validate_with(&mut client, &token, Some(false))
            .await
            .map(drop)
    })
    .await
}

/// RotateSession too: it answers a reused token before acting on the reuse, so neither its
/// status nor its time tells a prober the token was once good.
#[tokio::test]
async fn rotating_a_reused_token_is_answered_like_an_unknown_one() {
    reuse_is_no_oracle(|mut client, token| async move {
        client
            .rotate_session(pb::RotateSessionRequest {
                token,
                ..Default::default()
            })
            .await
            .map(drop)
    })
    .await
}

/// Presents replaced tokens (past the grace period) and forged ones through `present`: the
/// same status, message and (median) time for both.
async fn reuse_is_no_oracle<F, Fut>(present: F)
where
    F: Fn(SessionServiceClientChannel, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let server = TestServer::start().await;
    let mut client = server.client().await;
    const N: usize = 40;
    let mut reused = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..N {
        let created = create(&mut client, "t", &format!("user-{i}")).await;
        rotate(&mut client, &created.token).await;
        unknown.push(forged_for(&created.token));
        reused.push(created.token);
    }
    server.advance(Duration::from_secs(11));
    // Warm the connection and the code paths.
    for token in reused.iter().chain(&unknown).take(4) {
        let _ = present(client.clone(), token.clone()).await;
    }
    let (mut reused_times, mut unknown_times) = (Vec::new(), Vec::new());
    for (r, u) in reused.iter().zip(&unknown).skip(2) {
        for (token, times) in [(r, &mut reused_times), (u, &mut unknown_times)] {
            let started = Instant::now();
            let status = present(client.clone(), token.clone())
                .await
                .expect_err("invalid");
            times.push(started.elapsed());
            assert_eq!(status.code(), Code::Unauthenticated);
            assert_eq!(status.message(), "session not valid");
        }
    }
    let (r, u) = (median(reused_times), median(unknown_times));
    // The same class: a reused token does not wait for the durable revoke it causes (a
    // write with fdatasync, several times a validation).
    assert!(
        r < u * 3 + Duration::from_millis(1) && u < r * 3 + Duration::from_millis(1),
        "median reused {r:?} vs unknown {u:?}"
    );
}

#[tokio::test]
async fn reuse_policy_fields_are_validated_and_kept() {
    let server = TestServer::start().await;
    let got = update(
        &server,
        "t",
        pb::Policy {
            token_reuse_action: pb::TokenReuseAction::Flag as i32,
            rotation_grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        },
        &["token_reuse_action", "rotation_grace_period"],
    )
    .await
    .expect("set");
    assert_eq!(got.token_reuse_action(), pb::TokenReuseAction::Flag);
    assert_eq!(got.rotation_grace_period.map(|d| d.seconds), Some(0));
    let err = update(
        &server,
        "t",
        pb::Policy {
            rotation_grace_period: Some(prost_types::Duration {
                seconds: 301,
                nanos: 0,
            }),
            ..Default::default()
        },
        &["rotation_grace_period"],
    )
    .await
    .expect_err("over 5 minutes");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("policy.rotation_grace_period:"),
        "{}",
        err.message()
    );
    let err = update(
        &server,
        "t",
        pb::Policy {
            token_reuse_action: 99,
            ..Default::default()
        },
        &["token_reuse_action"],
    )
    .await
    .expect_err("unknown action");
    assert!(
        err.message().starts_with("policy.token_reuse_action:"),
        "{}",
        err.message()
    );

    // With grace 0 and FLAG: the old token is refused at once, the session flagged and working.
    let mut client = server.client().await;
    let created = create(&mut client, "t", "u").await;
    let rotated = rotate(&mut client, &created.token).await;
    assert_not_valid(validate(&mut client, &created.token).await);
    let id = created.session.expect("s").session_id;
    let mut session = get(&mut client, &id).await.expect("get");
    for _ in 0..300 {
        if !session.security_flags.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        session = get(&mut client, &id).await.expect("get");
    }
    assert_eq!(session.security_flags.len(), 1);
    let valid = validate(&mut client, &rotated.token).await.expect("works");
    assert_eq!(valid.security_flags[0].kind(), pb::FlagKind::TokenReuse);
}

// === device-bound sessions ===

#[path = "common/dbsc.rs"]
mod dbsc;

async fn create_bound(
    client: &mut SessionServiceClientChannel,
    user: &str,
    jwk: &str,
) -> pb::CreateSessionResponse {
    client
        .create_session(pb::CreateSessionRequest {
            binding_key: jwk.into(),
            ..create_request("t", user)
        })
        .await
        .expect("create bound")
        .into_inner()
}

async fn challenge(client: &mut SessionServiceClientChannel, id: &str) -> String {
    client
        .get_binding_challenge(pb::GetBindingChallengeRequest {
            session_id: id.into(),
        })
        .await
        .expect("challenge")
        .into_inner()
        .challenge
}

async fn refresh(
    client: &mut SessionServiceClientChannel,
    id: &str,
    proof: String,
) -> Result<pb::RefreshBoundSessionResponse, tonic::Status> {
    client
        .refresh_bound_session(pb::RefreshBoundSessionRequest {
            session_id: id.into(),
            proof,
        })
        .await
        .map(|r| r.into_inner())
}

/// Unix seconds of the test clock now.
fn now_secs(server: &TestServer) -> i64 {
    use session_authority::clock::Clock;
    (server.clock.now().as_millis() / 1000) as i64
}

#[tokio::test]
async fn a_bound_session_refreshes_with_a_valid_proof_and_its_token_lives_only_the_ttl() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, jwk) = dbsc::key_pair(7);
    let created = create_bound(&mut client, "u", &jwk).await;
    let session = created.session.expect("s");
    let id = session.session_id.clone();
    assert!(session.bound);
    assert_eq!(session.binding_key, jwk);
    let ttl = 600;
    assert_eq!(
        session.bound_token_expires_at.map(|t| t.seconds),
        Some(now_secs(&server) + ttl)
    );
    assert_eq!(
        created.cookie.and_then(|c| c.max_age).map(|d| d.seconds),
        Some(ttl),
        "the cookie lives as long as the token"
    );
    // Binding costs nothing until the token's end: it validates like any other.
    validate(&mut client, &created.token)
        .await
        .expect("bound token");

    // A bound session renews only by proof.
    let err = client
        .rotate_session(pb::RotateSessionRequest {
            token: created.token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("rotation of a bound session");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Used halfway (the test idle timeout is 600 s too), then stale at the token's end.
    server.advance(Duration::from_secs(300));
    validate(&mut client, &created.token).await.expect("in use");
    server.advance(Duration::from_secs(300));
    assert_not_valid(validate(&mut client, &created.token).await);
    assert_eq!(
        get(&mut client, &id).await.expect("get").state(),
        pb::SessionState::Active,
        "the session lives on; only its token is stale"
    );

    let c = challenge(&mut client, &id).await;
    let refreshed = refresh(
        &mut client,
        &id,
        dbsc::proof(&key, &c, &id, now_secs(&server)),
    )
    .await
    .expect("refresh");
    let s = validate(&mut client, &refreshed.token)
        .await
        .expect("the new token");
    assert_eq!(s.rotation_count, 1);
    assert_eq!(
        s.bound_token_expires_at.map(|t| t.seconds),
        Some(now_secs(&server) + ttl)
    );
    assert!(refreshed.sequence > created.sequence);

    // The refresh carries the next challenge: one call per refresh from then on. It answers
    // once, only for this session, until a minute after the new token ends.
    assert_eq!(
        refreshed.next_challenge_expires_at.map(|t| t.seconds),
        Some(now_secs(&server) + ttl + 60)
    );
    let theirs = create_bound(&mut client, "v", &jwk).await;
    let their_id = theirs.session.expect("s").session_id;
    let err = refresh(
        &mut client,
        &their_id,
        dbsc::proof(
            &key,
            &refreshed.next_challenge,
            &their_id,
            now_secs(&server),
        ),
    )
    .await
    .expect_err("another session's carried challenge");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Kept until the token runs out, it still refreshes the session.
    let half = Duration::from_secs(ttl as u64 / 2);
    server.advance(half);
    validate(&mut client, &refreshed.token)
        .await
        .expect("in use");
    server.advance(half);
    assert_not_valid(validate(&mut client, &refreshed.token).await);
    let next = dbsc::proof(&key, &refreshed.next_challenge, &id, now_secs(&server));
    let again = refresh(&mut client, &id, next.clone())
        .await
        .expect("refresh with the carried challenge");
    assert_ne!(again.next_challenge, refreshed.next_challenge);
    let err = refresh(&mut client, &id, next).await.expect_err("replayed");
    assert_eq!(err.code(), Code::Unauthenticated);
    validate(&mut client, &again.token)
        .await
        .expect("the third token");
    server.advance(half);
    validate(&mut client, &again.token).await.expect("in use");
    server.advance(half + Duration::from_secs(61));
    let late = dbsc::proof(&key, &again.next_challenge, &id, now_secs(&server));
    let err = refresh(&mut client, &id, late)
        .await
        .expect_err("the carried challenge expires too");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Only the challenge had expired: a fetched one refreshes the session.
    let c = challenge(&mut client, &id).await;
    refresh(
        &mut client,
        &id,
        dbsc::proof(&key, &c, &id, now_secs(&server)),
    )
    .await
    .expect("a fetched challenge after the carried one expired");
}

/// A bound token that expired is dead for good: the device's next refresh does not give it the
/// rotation grace period back (a thief holding the expired cookie got ten seconds of validity
/// after each refresh, then counted as reuse and logged the victim out).
#[tokio::test]
async fn an_expired_bound_token_stays_dead_after_the_device_refreshes() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, jwk) = dbsc::key_pair(7);
    let created = create_bound(&mut client, "u", &jwk).await;
    let id = created.session.clone().expect("s").session_id;
    // Used halfway (the test idle timeout is 600 s too), then expired at the token's end.
    server.advance(Duration::from_secs(300));
    validate(&mut client, &created.token).await.expect("in use");
    server.advance(Duration::from_secs(301));
    assert_not_valid(validate(&mut client, &created.token).await);
    let proof = dbsc::proof(&key, &created.next_challenge, &id, now_secs(&server));
    let refreshed = refresh(&mut client, &id, proof).await.expect("refresh");
    assert_not_valid(validate(&mut client, &created.token).await);
    server.advance(Duration::from_secs(11));
    assert_not_valid(validate(&mut client, &created.token).await);
    // Refused like any expired token, not taken for reuse: the session lives on.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let session = validate(&mut client, &refreshed.token)
        .await
        .expect("the device's new token");
    assert!(session.security_flags.is_empty());

    // A token refreshed before its end keeps the grace period, never past its own end.
    let created = create_bound(&mut client, "v", &jwk).await;
    let id = created.session.clone().expect("s").session_id;
    server.advance(Duration::from_secs(595));
    let proof = dbsc::proof(&key, &created.next_challenge, &id, now_secs(&server));
    refresh(&mut client, &id, proof).await.expect("refresh");
    validate(&mut client, &created.token)
        .await
        .expect("in its grace period and before its end");
    server.advance(Duration::from_secs(5));
    assert_not_valid(validate(&mut client, &created.token).await);
}

/// RotateSession answers UNAUTHENTICATED for every dead token: a bound session's expired current
/// token is not told apart (it once got FAILED_PRECONDITION, "the session is device-bound").
#[tokio::test]
async fn rotating_an_expired_bound_token_is_unauthenticated() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (_, jwk) = dbsc::key_pair(7);
    let created = create_bound(&mut client, "u", &jwk).await;
    server.advance(Duration::from_secs(300));
    validate(&mut client, &created.token).await.expect("in use");
    server.advance(Duration::from_secs(301));
    let err = client
        .rotate_session(pb::RotateSessionRequest {
            token: created.token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "session not valid");
}

/// A rotation at login (`privilege_change`) kills the token the browser held before at once,
/// whatever the grace period: a token planted by an attacker (session fixation) never counts as
/// the logged-in session. A request still carrying it is refused, not taken for theft.
#[tokio::test]
async fn a_rotation_at_login_kills_the_old_token_at_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let planted = create(&mut client, "t", "u").await;
    let id = planted.session.clone().expect("s").session_id;
    let logged_in = client
        .rotate_session(pb::RotateSessionRequest {
            token: planted.token.clone(),
            privilege_change: true,
        })
        .await
        .expect("rotate at login")
        .into_inner();
    assert_not_valid(validate(&mut client, &planted.token).await);
    server.advance(Duration::from_secs(11));
    assert_not_valid(validate(&mut client, &planted.token).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let session = get(&mut client, &id).await.expect("get");
    assert_eq!(session.state(), pb::SessionState::Active);
    assert!(session.security_flags.is_empty(), "not reuse");
    validate(&mut client, &logged_in.token)
        .await
        .expect("the logged-in token");
}

#[tokio::test]
async fn a_bound_session_is_created_with_its_first_challenge() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, jwk) = dbsc::key_pair(7);
    let created = create_bound(&mut client, "u", &jwk).await;
    let id = created.session.clone().expect("s").session_id;
    assert_eq!(
        created.next_challenge_expires_at.map(|t| t.seconds),
        Some(now_secs(&server) + 600 + 60),
        "answerable until a minute after the token ends"
    );
    // The device refreshes when its token is about to end, with no GetBindingChallenge call.
    server.advance(Duration::from_secs(590));
    validate(&mut client, &created.token).await.expect("in use");
    let proof = dbsc::proof(&key, &created.next_challenge, &id, now_secs(&server));
    let refreshed = refresh(&mut client, &id, proof.clone())
        .await
        .expect("refresh with the creation's challenge");
    validate(&mut client, &refreshed.token)
        .await
        .expect("the new token");
    let err = refresh(&mut client, &id, proof)
        .await
        .expect_err("replayed");
    assert_eq!(err.code(), Code::Unauthenticated);

    let unbound = create(&mut client, "t", "u").await;
    assert!(unbound.next_challenge.is_empty());
    assert!(unbound.next_challenge_expires_at.is_none());
}

#[tokio::test]
async fn a_refresh_is_refused_for_every_bad_proof_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (key, jwk) = dbsc::key_pair(7);
    let (other_key, other_jwk) = dbsc::key_pair(9);
    let created = create_bound(&mut client, "u", &jwk).await;
    let id = created.session.expect("s").session_id;
    let other = create_bound(&mut client, "v", &other_jwk).await;
    let other_id = other.session.expect("s").session_id;
    let now = now_secs(&server);

    let c = challenge(&mut client, &id).await;
    let theirs = challenge(&mut client, &other_id).await;
    let bad = [
        (
            "forged: signed by another key",
            dbsc::proof(&other_key, &c, &id, now),
        ),
        (
            "another session's challenge",
            dbsc::proof(&key, &theirs, &id, now),
        ),
        (
            "a challenge never issued",
            dbsc::proof(&key, "made-up", &id, now),
        ),
        ("for another session", dbsc::proof(&key, &c, &other_id, now)),
        ("iat too old", dbsc::proof(&key, &c, &id, now - 61)),
        ("iat too new", dbsc::proof(&key, &c, &id, now + 61)),
        ("not a JWS", "a.b.c".to_string()),
        ("empty", String::new()),
    ];
    for (what, proof) in bad {
        let err = refresh(&mut client, &id, proof).await.expect_err(what);
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert_eq!(err.message(), "session not valid", "{what}");
    }
    let s = validate(&mut client, &created.token)
        .await
        .expect("nothing changed");
    assert_eq!(s.rotation_count, 0);

    // The right proof works once; replayed, it is refused.
    let good = dbsc::proof(&key, &c, &id, now);
    refresh(&mut client, &id, good.clone())
        .await
        .expect("valid");
    let err = refresh(&mut client, &id, good).await.expect_err("replayed");
    assert_eq!(err.code(), Code::Unauthenticated);

    // An expired challenge.
    let c = challenge(&mut client, &id).await;
    server.advance(Duration::from_secs(61));
    let err = refresh(
        &mut client,
        &id,
        dbsc::proof(&key, &c, &id, now_secs(&server)),
    )
    .await
    .expect_err("expired challenge");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn binding_input_is_checked() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (_, jwk) = dbsc::key_pair(7);
    for bad in [
        jwk.replace("P-256", "P-384"),
        jwk.replace('}', r#","d":"c2VjcmV0"}"#),
        r#"{"kty":"EC"}"#.to_string(),
        "not json".to_string(),
        jwk.replacen('A', "B", 1),
    ] {
        let err = client
            .create_session(pb::CreateSessionRequest {
                binding_key: bad.clone(),
                ..create_request("t", "u")
            })
            .await
            .expect_err("bad key");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(
            err.message().starts_with("binding_key:"),
            "{}",
            err.message()
        );
    }
    let unbound = create(&mut client, "t", "u").await;
    let err = client
        .get_binding_challenge(pb::GetBindingChallengeRequest {
            session_id: unbound.session.expect("s").session_id,
        })
        .await
        .expect_err("not bound");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = client
        .get_binding_challenge(pb::GetBindingChallengeRequest {
            session_id: "0".repeat(32),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

// === new device, new place ===

#[tokio::test]
async fn a_second_login_from_another_browser_and_country_is_new_and_counted() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let login = |ua: &str, country: &str| pb::CreateSessionRequest {
        device: Some(pb::Device {
            user_agent: ua.into(),
            location: Some(pb::Location {
                country: country.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..create_request("t", "u")
    };
    const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
    const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
    let first = client
        .create_session(login(CHROME, "TH"))
        .await
        .expect("first")
        .into_inner()
        .session
        .expect("s");
    assert!(
        !first.new_device && !first.new_place,
        "a first login is not new"
    );
    let same = client
        .create_session(login(CHROME, "TH"))
        .await
        .expect("same")
        .into_inner()
        .session
        .expect("s");
    assert!(!same.new_device && !same.new_place);
    let new = client
        .create_session(login(FIREFOX, "GB"))
        .await
        .expect("new")
        .into_inner()
        .session
        .expect("s");
    assert!(new.new_device && new.new_place);
    let kinds: Vec<_> = new.security_flags.iter().map(|f| f.kind()).collect();
    assert_eq!(kinds, [pb::FlagKind::NewDevice, pb::FlagKind::NewPlace]);
    let stats = client
        .get_session_stats(pb::GetSessionStatsRequest {
            tenant_id: "t".into(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.new_device_logins_last_24h, 1);
    assert_eq!(stats.new_place_logins_last_24h, 1);
    assert_eq!(stats.flagged_sessions, 1);
}
