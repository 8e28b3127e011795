//! Prometheus metrics over HTTP. In a file of its own: a process has one metrics recorder.

mod common;

use std::time::Duration;

use common::*;
use session_authority::{config::Config, proto::v1 as pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: std::net::SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut body = String::new();
            stream.read_to_string(&mut body).await.expect("read");
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics endpoint never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_calls_events_and_subscribers() {
    let metrics_addr = free_loopback_addr();
    let server = TestServer::start_with(Config {
        metrics_listen: Some(metrics_addr),
        ..test_config()
    })
    .await;
    let mut client = server.client().await;
    let s = create(&mut client, "t", "u").await;
    assert_not_valid(validate(&mut client, "sat_not-a-token").await);
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: s.session.expect("s").session_id,
            reason: pb::RevokeReason::UserLogout as i32,
        })
        .await
        .expect("revoke");
    let _stream = pb::event_service_client::EventServiceClient::new(server.channel().await)
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .expect("watch");

    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(metrics_addr).await;
        if text.contains("session_authority_event_subscribers 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for expected in [
        r#"session_authority_rpc_total{method="/session_authority.v1.SessionService/CreateSession",code="OK"} 1"#,
        r#"session_authority_rpc_total{method="/session_authority.v1.SessionService/ValidateSession",code="UNAUTHENTICATED"} 1"#,
        r#"session_authority_events_total{type="created"} 1"#,
        r#"session_authority_events_total{type="revoked",reason="UserLogout"} 1"#,
        "session_authority_event_head 2",
        "session_authority_event_subscribers 1",
        "session_authority_store_flush_seconds",
        "session_authority_rpc_duration_seconds",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // No token ever appears in metrics.
    assert!(!text.contains("sat_"));
}
