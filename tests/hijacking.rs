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
        let _ = validate_with(&mut client, token, Some(false)).await;
    }
    let (mut reused_times, mut unknown_times) = (Vec::new(), Vec::new());
    for (r, u) in reused.iter().zip(&unknown).skip(2) {
        for (token, times) in [(r, &mut reused_times), (u, &mut unknown_times)] {
            let started = Instant::now();
            let status = validate_with(&mut client, token, Some(false))
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
