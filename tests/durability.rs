//! What a reply acknowledges survives a restart and a crash; tokens never reach the disk; a foreign
//! data directory is refused.

mod common;

use std::{path::Path, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use common::*;
use session_authority::{config::Config, proto::v1 as pb};

#[tokio::test]
async fn sessions_and_revocations_survive_a_restart() {
    // No grace period: the replaced token must be dead after the restart (and, ignored, its
    // presentation writes nothing that would move the sequence checked below).
    let server = TestServer::start_with(Config {
        rotation_grace_period: Duration::ZERO,
        token_reuse_action: session_authority::model::policy::TokenReuseAction::Ignore,
        ..test_config()
    })
    .await;
    let mut client = server.client().await;
    let kept = create(&mut client, "t", "u").await;
    let revoked = create(&mut client, "t", "u").await;
    let rotated = create(&mut client, "t", "u").await;
    let r = client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: revoked.session.clone().expect("s").session_id,
            reason: 0,
        })
        .await
        .expect("revoke")
        .into_inner();
    let new_token = client
        .rotate_session(pb::RotateSessionRequest {
            token: rotated.token.clone(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    drop(client);

    let server = server.restart().await;
    let mut client = server.client().await;
    validate(&mut client, &kept.token)
        .await
        .expect("kept session survives");
    validate(&mut client, &new_token.token)
        .await
        .expect("rotated token survives");
    assert_not_valid(validate(&mut client, &revoked.token).await);
    assert_not_valid(validate(&mut client, &rotated.token).await);
    // The event sequence continues where it stopped.
    let next = create(&mut client, "t", "v").await;
    assert_eq!(next.sequence, new_token.sequence + 1);
    assert!(next.sequence > r.sequence);
}

#[tokio::test]
async fn no_token_or_secret_reaches_the_data_directory() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut tokens = Vec::new();
    for i in 0..50 {
        let c = create(&mut client, "t", &format!("u{i}")).await;
        tokens.push(c.token.clone());
        if i % 5 == 0 {
            let r = client
                .rotate_session(pb::RotateSessionRequest {
                    token: c.token,
                    ..Default::default()
                })
                .await
                .expect("rotate");
            tokens.push(r.into_inner().token);
        }
    }
    drop(client);
    let (dir, _) = server.stop().await;
    let files = read_all_files(dir.path());
    assert!(!files.is_empty());
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for token in &tokens {
        needles.push(token.as_bytes().to_vec());
        let raw = URL_SAFE_NO_PAD.decode(&token[4..]).expect("base64 body");
        // The 32-byte secret sits after the 16-byte session id.
        needles.push(raw[16..48].to_vec());
    }
    for (path, bytes) in &files {
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "a token or secret was found in {path}"
            );
        }
    }
}

fn read_all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                out.push((path.display().to_string(), bytes));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_foreign_data_directory_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("notes.txt"), b"someone's files").expect("write");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = Config {
        data_dir: data.clone(),
        ..test_config()
    };
    let clock = std::sync::Arc::new(session_authority::clock::SystemClock);
    let result = session_authority::run(listener, config, clock, std::future::pending()).await;
    let err = result.expect_err("must refuse");
    assert!(
        err.to_string().contains("not a session-authority store"),
        "{err}"
    );
    let names: Vec<_> = std::fs::read_dir(&data)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("notes.txt")]);
}

// === crash: the real binary, killed with SIGKILL ===

#[tokio::test]
async fn acknowledged_changes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (mut child, addr) = spawn_binary(&data, &[]).await;
    let client = connect(&addr).await;

    // Concurrent writers; every acknowledged result is recorded.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut live = Vec::new();
            let mut revoked = Vec::new();
            for i in 0..40 {
                let created = create(&mut c, "crash", &format!("w{w}-u{i}")).await;
                let session_id = created.session.expect("s").session_id;
                if i % 3 == 0 {
                    c.revoke_session(pb::RevokeSessionRequest {
                        session_id,
                        reason: 0,
                    })
                    .await
                    .expect("revoke");
                    revoked.push(created.token);
                } else {
                    live.push(created.token);
                }
            }
            (live, revoked)
        }));
    }
    let mut live = Vec::new();
    let mut revoked = Vec::new();
    for t in tasks {
        let (l, r) = t.await.expect("writer");
        live.extend(l);
        revoked.extend(r);
    }
    // No graceful shutdown: SIGKILL right after the last acknowledgement.
    child.start_kill().expect("kill");
    child.wait().await.expect("reaped");

    let (_child, addr) = spawn_binary(&data, &[]).await;
    let mut client = connect(&addr).await;
    for token in &live {
        validate(&mut client, token)
            .await
            .expect("acknowledged create survived kill -9");
    }
    for token in &revoked {
        assert_not_valid(validate(&mut client, token).await);
    }
}

/// Concurrent creations share batches in the writer (distinct users only). Every one must still
/// get its own outcome, a unique sequence, and the per-user limit; and all survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creations_keep_their_own_outcomes_limits_and_events() {
    let server = TestServer::start().await; // max_sessions_per_user: 5
    let client = server.client().await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            // 50 users with 6 creations each: one eviction per user.
            let user = format!("u{}", i % 50);
            client
                .create_session(create_request("t", &user))
                .await
                .expect("create")
                .into_inner()
        }));
    }
    let mut sequences = Vec::new();
    let mut evicted = 0;
    for t in tasks {
        let r = t.await.expect("task");
        sequences.push(r.sequence);
        evicted += r.evicted_session_ids.len();
    }
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(sequences.len(), 300, "each creation has its own event");
    assert_eq!(evicted, 50, "each user's sixth creation evicted one");
    let server = server.restart().await;
    let mut client = server.client().await;
    for u in 0..50 {
        let live = list_all(&mut client, "t", &format!("u{u}"), 100).await;
        assert_eq!(live.len(), 5, "user u{u}");
    }
    // The log holds every creation and eviction, in order, with no holes.
    let mut events = pb::event_service_client::EventServiceClient::new(server.channel().await)
        .watch_events(pb::WatchEventsRequest {
            after_sequence: Some(0),
            filter: None,
            announce_live: true,
            log_epoch: None,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut expected = 1;
    loop {
        let item = events.message().await.expect("ok").expect("open");
        match item.message.expect("message") {
            pb::watch_events_response::Message::Event(e) => {
                assert_eq!(e.sequence, expected);
                expected += 1;
            }
            pb::watch_events_response::Message::Heartbeat(_) => break,
        }
    }
    assert_eq!(expected - 1, 350, "300 creations and 50 evictions");
}
