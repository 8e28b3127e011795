//! The administrator's view: ListSessions filters, RevokeSessionsMatching (dry run and real, in
//! batches), GetSessionStats.

mod common;

use std::time::Duration;

use common::*;
use session_authority::{
    config::Config,
    proto::v1::{self as pb, session_service_client::SessionServiceClient},
};
use tonic::{transport::Channel, Code};

fn device(ip: &str, country: &str) -> Option<pb::Device> {
    Some(pb::Device {
        ip: ip.into(),
        location: Some(pb::Location {
            country: country.into(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

async fn create_from(
    client: &mut SessionServiceClient<Channel>,
    tenant: &str,
    user: &str,
    ip: &str,
    country: &str,
) -> pb::CreateSessionResponse {
    let mut req = create_request(tenant, user);
    req.device = device(ip, country);
    client
        .create_session(req)
        .await
        .expect("create")
        .into_inner()
}

async fn list_filtered(
    client: &mut SessionServiceClient<Channel>,
    tenant: &str,
    filter: pb::SessionFilter,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sessions(pb::ListSessionsRequest {
                tenant_id: tenant.into(),
                user_id: String::new(),
                page_size: 3,
                page_token,
                filter: Some(filter.clone()),
            })
            .await
            .expect("list")
            .into_inner();
        out.extend(page.sessions.into_iter().map(|s| s.user_id));
        if page.next_page_token.is_empty() {
            out.sort();
            return out;
        }
        page_token = page.next_page_token;
    }
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

#[tokio::test]
async fn listing_filters_by_place_ip_age_and_creation_window() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create_from(&mut client, "t", "gb-1", "192.0.2.1", "GB").await;
    create_from(&mut client, "t", "gb-2", "192.0.2.2", "GB").await;
    server.advance(Duration::from_secs(100));
    let window_start = common::START.as_millis() / 1000 + 100;
    create_from(&mut client, "t", "fr-1", "192.0.2.1", "FR").await;
    create_from(&mut client, "other", "gb-x", "192.0.2.1", "GB").await;
    server.advance(Duration::from_secs(100));

    let by_country = pb::SessionFilter {
        country: "GB".into(),
        ..Default::default()
    };
    assert_eq!(
        list_filtered(&mut client, "t", by_country).await,
        ["gb-1", "gb-2"]
    );
    let by_ip = pb::SessionFilter {
        ip: "192.0.2.1".into(),
        ..Default::default()
    };
    assert_eq!(
        list_filtered(&mut client, "t", by_ip).await,
        ["fr-1", "gb-1"]
    );
    let old = pb::SessionFilter {
        older_than: secs(150),
        ..Default::default()
    };
    assert_eq!(list_filtered(&mut client, "t", old).await, ["gb-1", "gb-2"]);
    let recent = pb::SessionFilter {
        created_after: Some(prost_types::Timestamp {
            seconds: window_start as i64,
            nanos: 0,
        }),
        ..Default::default()
    };
    assert_eq!(list_filtered(&mut client, "t", recent).await, ["fr-1"]);
    let err = client
        .list_sessions(pb::ListSessionsRequest {
            tenant_id: "t".into(),
            filter: Some(pb::SessionFilter {
                country: "France".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("bad country");
    assert!(
        err.message().starts_with("filter.country"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_dry_run_counts_and_samples_without_revoking() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut tokens = Vec::new();
    for i in 0..15 {
        tokens.push(
            create_from(&mut client, "t", &format!("u{i}"), "203.0.113.9", "NL")
                .await
                .token,
        );
    }
    let keep = create_from(&mut client, "t", "local", "198.51.100.1", "GB").await;
    let filter = pb::SessionFilter {
        country: "NL".into(),
        ..Default::default()
    };
    let dry = client
        .revoke_sessions_matching(pb::RevokeSessionsMatchingRequest {
            tenant_id: "t".into(),
            user_id: String::new(),
            filter: Some(filter.clone()),
            reason: pb::RevokeReason::SuspiciousActivity as i32,
            dry_run: true,
        })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(dry.matched, 15);
    assert_eq!(dry.sample.len(), 10);
    assert!(dry
        .sample
        .iter()
        .all(|s| s.state() == pb::SessionState::Active));
    for token in &tokens {
        validate(&mut client, token)
            .await
            .expect("a dry run revokes nothing");
    }

    let real = client
        .revoke_sessions_matching(pb::RevokeSessionsMatchingRequest {
            tenant_id: "t".into(),
            user_id: String::new(),
            filter: Some(filter),
            reason: pb::RevokeReason::SuspiciousActivity as i32,
            dry_run: false,
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(real.matched, 15);
    assert!(real.sequence > 0);
    for token in &tokens {
        assert_not_valid(validate(&mut client, token).await);
    }
    validate(&mut client, &keep.token)
        .await
        .expect("not matched, not revoked");

    // An empty filter is refused rather than ending a whole tenant.
    let err = client
        .revoke_sessions_matching(pb::RevokeSessionsMatchingRequest {
            tenant_id: "t".into(),
            ..Default::default()
        })
        .await
        .expect_err("empty filter");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("filter"), "{}", err.message());
}

#[tokio::test]
async fn idle_and_old_sessions_are_revoked_in_bulk_while_traffic_flows() {
    let server = TestServer::start_with(Config {
        max_sessions_per_user: 10_000,
        idle_timeout: Duration::from_secs(3600),
        absolute_timeout: Duration::from_secs(86_400),
        ..test_config()
    })
    .await;
    let client = server.client().await;
    // 1,200 sessions, then 30 minutes pass, then a fresh one that keeps validating.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                create(&mut c, "big", &format!("w{w}-u{i}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("creator");
    }
    server.advance(Duration::from_secs(1800));
    let mut c = client.clone();
    let fresh = create(&mut c, "big", "fresh").await;
    let validator = {
        let mut c = client.clone();
        let token = fresh.token.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..200 {
                validate(&mut c, &token)
                    .await
                    .expect("traffic keeps flowing");
                ok += 1;
            }
            ok
        })
    };
    let r = c
        .revoke_sessions_matching(pb::RevokeSessionsMatchingRequest {
            tenant_id: "big".into(),
            user_id: String::new(),
            filter: Some(pb::SessionFilter {
                idle_longer_than: secs(900),
                ..Default::default()
            }),
            reason: pb::RevokeReason::Policy as i32,
            dry_run: false,
        })
        .await
        .expect("bulk revoke")
        .into_inner();
    assert_eq!(r.matched, 1200);
    assert_eq!(validator.await.expect("validator"), 200);
    assert_eq!(list_all(&mut c, "big", "", 1000).await.len(), 1);
}

#[tokio::test]
async fn stats_count_live_users_flags_and_the_last_day() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let a1 = create(&mut client, "t", "alice").await;
    create(&mut client, "t", "alice").await;
    create(&mut client, "t", "bob").await;
    let c = create(&mut client, "t", "carol").await;
    create(&mut client, "other", "dave").await;
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: c.session.expect("s").session_id,
            reason: pb::RevokeReason::UserLogout as i32,
        })
        .await
        .expect("revoke");
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: a1.session.expect("s").session_id,
            reason: pb::RevokeReason::Admin as i32,
        })
        .await
        .expect("revoke");
    let stats = client
        .get_session_stats(pb::GetSessionStatsRequest {
            tenant_id: "t".into(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.live_sessions, 2);
    assert_eq!(stats.distinct_users, 2);
    assert_eq!(stats.flagged_sessions, 0);
    assert_eq!(stats.created_last_24h, 4);
    assert_eq!(
        stats.revoked_last_24h.get("REVOKE_REASON_USER_LOGOUT"),
        Some(&1)
    );
    assert_eq!(stats.revoked_last_24h.get("REVOKE_REASON_ADMIN"), Some(&1));
    // A day later the window is empty, and the sessions expired.
    server.advance(Duration::from_secs(86_401));
    let later = client
        .get_session_stats(pb::GetSessionStatsRequest {
            tenant_id: "t".into(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(later.live_sessions, 0);
    assert_eq!(later.created_last_24h, 0);
    assert!(later.revoked_last_24h.is_empty());
}
