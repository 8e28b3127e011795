//! Faults: a damaged or mixed-up data directory is refused (never started empty over), and a full
//! disk fails writes with UNAVAILABLE, turns health NOT_SERVING, acknowledges nothing it did not
//! store, and loses nothing acknowledged.

mod common;

use std::{path::Path, sync::Arc};

use common::*;
use session_authority::{clock::SystemClock, config::Config, proto::v1 as pb};
use tonic::Code;

/// A store with some sessions in it, stopped cleanly; returns a token that must survive.
async fn store_with_data(dir: &Path) -> String {
    let (mut child, addr) = spawn_binary(dir, &[]).await;
    let mut client = connect(&addr).await;
    let mut token = String::new();
    for i in 0..50 {
        token = create(&mut client, "t", &format!("u{i}")).await.token;
    }
    drop(client);
    // SIGTERM: a clean stop.
    let pid = child.id().expect("pid");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    child.wait().await.expect("stopped");
    token
}

async fn start_on(dir: &Path) -> session_authority::error::Result<()> {
    // 127.0.0.2, as every in-process test server (see `TestServer::start_in`).
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind");
    let config = Config {
        data_dir: dir.to_path_buf(),
        ..test_config()
    };
    // If it starts, stop it at once: the point is whether it refuses.
    session_authority::run(listener, config, Arc::new(SystemClock), async {}).await
}

fn damage(dir: &Path, how: &str) {
    let db = dir.join("db");
    let len = std::fs::metadata(&db).expect("db file").len() as usize;
    match how {
        "zeroed" => std::fs::write(&db, vec![0u8; len]).expect("write"),
        "truncated" => std::fs::write(&db, b"").expect("write"),
        "garbage" => {
            let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
            std::fs::write(&db, garbage).expect("write")
        }
        other => panic!("unknown damage {other}"),
    }
}

#[tokio::test]
async fn a_damaged_store_is_refused_every_time_never_started_empty() {
    for how in ["zeroed", "truncated", "garbage"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        store_with_data(&dir).await;
        damage(&dir, how);
        let marker = std::fs::read(dir.join("store.id")).expect("marker");
        // Refused every time it is tried: it never becomes a fresh, empty store.
        for attempt in 0..2 {
            let err = start_on(&dir).await.expect_err(how);
            let message = err.to_string();
            assert!(
                message.contains("refusing to open the data directory"),
                "{how} (attempt {attempt}): {message}"
            );
            assert!(
                message.contains("corrupt") || message.contains("store"),
                "{how}: the message says why: {message}"
            );
        }
        // sled's recovery may rewrite a damaged log while opening it (it has no read-only
        // mode), but the marker that makes the refusal stick is never touched.
        assert!(
            std::fs::read(dir.join("store.id")).expect("marker") == marker,
            "{how}: marker kept"
        );
    }
}

#[tokio::test]
async fn mixed_up_store_files_are_refused_and_a_lost_marker_is_restored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let token = store_with_data(&a).await;
    store_with_data(&b).await;
    // Store b's marker in store a's directory: two stores' files mixed.
    std::fs::copy(b.join("store.id"), a.join("store.id")).expect("copy");
    let err = start_on(&a).await.expect_err("mixed");
    assert!(err.to_string().contains("mixed"), "{err}");

    // Without a marker, a's own data identifies it: the marker is put back, nothing is lost.
    std::fs::remove_file(a.join("store.id")).expect("remove");
    start_on(&a).await.expect("starts");
    assert!(a.join("store.id").exists());
    let (_child, addr) = spawn_binary(&a, &[]).await;
    let mut client = connect(&addr).await;
    validate(&mut client, &token).await.expect("data intact");
}

// === disk full ===

/// Mounts a tmpfs of `mib` MiB at `at`; false if this is not possible here (not root).
fn mount_tmpfs(at: &Path, mib: u32) -> bool {
    std::fs::create_dir_all(at).expect("mkdir");
    std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_writes_and_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mount = tmp.path().join("small");
    if !mount_tmpfs(&mount, 24) {
        eprintln!("SKIPPED a_full_disk_fails_writes_and_loses_nothing_acknowledged: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _unmount = Unmount(&mount);
    let dir = mount.join("data");
    let (mut child, addr) = spawn_binary(&dir, &["--max-sessions-per-user", "10000"]).await;
    let channel = connect_channel(&addr).await;
    let mut client = pb::session_service_client::SessionServiceClient::new(channel.clone());

    // Fill the disk with sessions until writes fail.
    let mut acknowledged = Vec::new();
    let mut failure = None;
    let padding = "p".repeat(250);
    for i in 0..200_000 {
        let mut req = create_request("t", &format!("u{i}"));
        for k in 0..16 {
            req.attributes.insert(format!("k{k}"), padding.clone());
        }
        match client.create_session(req).await {
            Ok(r) => acknowledged.push(r.into_inner().token),
            Err(s) => {
                failure = Some(s);
                break;
            }
        }
    }
    let failure = failure.expect("the disk filled up");
    assert_eq!(failure.code(), Code::Unavailable, "{failure:?}");
    assert!(
        acknowledged.len() > 100,
        "some writes fit before the disk was full"
    );
    // Health turns NOT_SERVING, and further writes fail too.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    // What health said, each time it changed: a timeout then shows whether the server said
    // SERVING or could not answer at all.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    eventually("health NOT_SERVING", || {
        let mut health = health.clone();
        let seen = seen.clone();
        let failure = failure.message().to_owned();
        async move {
            let answer = health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status());
            let said = format!("{answer:?}");
            let mut last = seen.lock().expect("not poisoned");
            if *last != said {
                eprintln!("health after the failure ({failure}): {said}");
                *last = said;
            }
            answer.ok() == Some(tonic_health::pb::health_check_response::ServingStatus::NotServing)
        }
    })
    .await;
    let err = client
        .create_session(create_request("t", "late"))
        .await
        .expect_err("still failing");
    assert_eq!(err.code(), Code::Unavailable);
    let _ = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;

    // Space returns (a bigger disk): stop, grow the tmpfs, restart: everything acknowledged is
    // there.
    child.start_kill().expect("kill");
    child.wait().await.expect("reaped");
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&mount)
        .status()
        .expect("remount");
    assert!(status.success());
    let (mut child, addr) = spawn_binary(&dir, &[]).await;
    let mut client = connect(&addr).await;
    for token in &acknowledged {
        validate(&mut client, token)
            .await
            .expect("every acknowledged session survived the full disk");
    }
    create(&mut client, "t", "after").await;
    // Stop the server before the tmpfs is unmounted, or the unmount finds it busy.
    child.start_kill().expect("kill");
    child.wait().await.expect("reaped");
}
