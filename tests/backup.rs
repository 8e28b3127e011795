//! Backups: a consistent online snapshot, restored offline into a new directory, with everything
//! acknowledged in it; refusals of damaged files and occupied directories; admin-only.

mod common;

use std::sync::Arc;

use common::*;
use session_authority::{
    backup,
    config::{Config, Role},
    proto::v1::{
        self as pb, event_service_client::EventServiceClient,
        policy_service_client::PolicyServiceClient, watch_events_response::Message,
    },
};
use tonic::Code;

/// A login from `country` at `(lat, lon)` with `user_agent`: it leaves the user's last place and
/// a login in the store.
fn login(
    user: &str,
    user_agent: &str,
    country: &str,
    (lat, lon): (f64, f64),
) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        device: Some(pb::Device {
            user_agent: user_agent.into(),
            location: Some(pb::Location {
                country: country.into(),
                latitude: Some(lat),
                longitude: Some(lon),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..create_request("acme", user)
    }
}
const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0.0.0 Safari/537.36";

/// The first heartbeat of a stream that starts at the head: the log's epoch and head.
async fn epoch_and_head(server: &TestServer) -> (u64, u64) {
    let mut stream = watch_from(EventServiceClient::new(server.channel().await), None, true).await;
    match stream.message().await.expect("ok").expect("open").message {
        Some(Message::Heartbeat(h)) => (h.log_epoch, h.head_sequence),
        other => panic!("expected the live heartbeat, got {other:?}"),
    }
}

#[tokio::test]
async fn a_cursor_from_before_a_restore_is_out_of_range() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "t", "before-backup").await;
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("backup.sab");
    backup::fetch(server.channel().await, None, &file)
        .await
        .expect("backup");
    // The original goes on: a cache following it holds a cursor past the backup's head.
    for user in ["a", "b", "c"] {
        create(&mut client, "t", user).await;
    }
    let (old_epoch, old_cursor) = epoch_and_head(&server).await;
    assert_ne!(old_epoch, 0);

    let restored = Arc::new(tempfile::tempdir().expect("tempdir"));
    backup::restore(&file, &restored.path().join("data"), false).expect("restore");
    let copy = TestServer::start_in(restored, server.clock.clone(), test_config()).await;
    let mut c = copy.client().await;
    // The restored timeline reuses the numbers the old one handed out after the backup.
    for user in ["x", "y", "z", "w"] {
        create(&mut c, "t", user).await;
    }
    let (new_epoch, new_head) = epoch_and_head(&copy).await;
    assert_ne!(new_epoch, old_epoch, "a restore starts a new epoch");
    assert!(new_head >= old_cursor);

    let err = EventServiceClient::new(copy.channel().await)
        .watch_events(pb::WatchEventsRequest {
            after_sequence: Some(old_cursor),
            filter: None,
            announce_live: true,
            log_epoch: Some(old_epoch),
        })
        .await
        .expect_err("a cursor of the old timeline");
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(err.message().starts_with("log_epoch"), "{}", err.message());
    // A subscriber that sends no epoch is told by every message which epoch it is reading.
    let mut legacy = EventServiceClient::new(copy.channel().await)
        .watch_events(pb::WatchEventsRequest {
            after_sequence: Some(old_cursor),
            filter: None,
            announce_live: true,
            log_epoch: None,
        })
        .await
        .expect("accepted without an epoch")
        .into_inner();
    match legacy.message().await.expect("ok").expect("open").message {
        Some(Message::Event(e)) => assert_eq!(e.log_epoch, new_epoch),
        Some(Message::Heartbeat(h)) => assert_eq!(h.log_epoch, new_epoch),
        None => panic!("empty message"),
    }
    // The copy's own cursors resume as usual.
    EventServiceClient::new(copy.channel().await)
        .watch_events(pb::WatchEventsRequest {
            after_sequence: Some(new_head),
            filter: None,
            announce_live: true,
            log_epoch: Some(new_epoch),
        })
        .await
        .expect("same epoch");
}

#[tokio::test]
async fn a_backup_restores_into_a_server_with_everything_acknowledged() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let live = create(&mut client, "acme", "alice").await;
    let revoked = create(&mut client, "acme", "bob").await;
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: revoked.session.expect("s").session_id,
            reason: 0,
        })
        .await
        .expect("revoke");
    let mut policies = PolicyServiceClient::new(server.channel().await);
    let mut p = policies
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .policy
        .expect("p");
    p.max_sessions_per_user = 4;
    policies
        .set_policy(pb::SetPolicyRequest {
            policy: Some(p),
            update_mask: None,
        })
        .await
        .expect("set");
    client
        .create_session(login("erin", FIREFOX, "TH", (13.75, 100.5)))
        .await
        .expect("erin in Bangkok");
    let head = create(&mut client, "acme", "carol").await.sequence;

    // Online: the server keeps serving while the backup is taken.
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("backup.sab");
    let entries = backup::fetch(server.channel().await, None, &file)
        .await
        .expect("backup");
    assert!(entries > 10);
    create(&mut client, "acme", "after-backup").await;

    // Offline restore into a new directory, and a server on it.
    let restored = Arc::new(tempfile::tempdir().expect("tempdir"));
    let n = backup::restore(&file, &restored.path().join("data"), false).expect("restore");
    assert_eq!(n, entries);
    let copy = TestServer::start_in(restored, server.clock.clone(), test_config()).await;
    let mut c = copy.client().await;
    validate(&mut c, &live.token)
        .await
        .expect("live session restored");
    assert_not_valid(validate(&mut c, &revoked.token).await);
    let p = PolicyServiceClient::new(copy.channel().await)
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(!p.is_default && p.policy.expect("p").max_sessions_per_user == 4);
    // The event log came along, and its sequence continues from the backup's head (under a new
    // log epoch: see `a_cursor_from_before_a_restore_is_out_of_range`).
    assert_eq!(create(&mut c, "acme", "dave").await.sequence, head + 1);
    assert!(list_all(&mut c, "acme", "after-backup", 10)
        .await
        .is_empty());
    // Records only, and the restore rebuilt the indexes: listing finds the live session, and
    // the sweeper finds it by its deadline.
    let (version, records) = backup::read_snapshot(&file).expect("read");
    assert_eq!(version, backup::Version::Records);
    assert!(records
        .iter()
        .all(|(k, _)| k[0] != b'u' && k[0] != b'd' && k.as_slice() != b"mlogepoch"));
    // Per-user records in their maps, whatever the backend keeps them in: erin's last place and
    // logins came along, so her login from elsewhere is new and impossible.
    for map in [b'l', b'o'] {
        let key = [&[map][..], b"acme\0erin\0"].concat();
        assert!(records.iter().any(|(k, _)| *k == key), "{}", map as char);
    }
    let elsewhere = c
        .create_session(login("erin", CHROME, "GB", (51.5, -0.12)))
        .await
        .expect("erin in London")
        .into_inner()
        .session
        .expect("session");
    assert!(elsewhere.new_device && elsewhere.new_place);
    assert_eq!(elsewhere.flags.len(), 1, "impossible travel");
    let alice = list_all(&mut c, "acme", "alice", 10).await;
    assert_eq!(alice.len(), 1);
    copy.advance(std::time::Duration::from_secs(601));
    eventually("the sweeper expires the restored session", || {
        let mut c = c.clone();
        let id = alice[0].session_id.clone();
        async move {
            get(&mut c, &id).await.expect("get").state() == pb::SessionState::Expired
                && list_all(&mut c, "acme", "alice", 10).await.is_empty()
        }
    })
    .await;
}

/// A backup written by the release before backups held records (sled's keyspace, version 1):
/// alice's session was live, bob's revoked.
#[tokio::test]
async fn a_version_1_backup_still_restores() {
    let restored = Arc::new(tempfile::tempdir().expect("tempdir"));
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/backup-v1.sab");
    let (version, _) = backup::read_snapshot(&fixture).expect("read");
    assert_eq!(version, backup::Version::Keyspace);
    backup::restore(&fixture, &restored.path().join("data"), false).expect("restore");
    // A minute after alice's session was created (2026-11-29T06:50:29.388Z), so it is live.
    let clock = Arc::new(session_authority::clock::ManualClock::new(
        session_authority::clock::Timestamp::from_millis(1_795_935_089_388),
    ));
    let server = TestServer::start_in(restored, clock, test_config()).await;
    let mut c = server.client().await;
    let alice = "sat_ky4bDSxou9_FIInKg_LCIwRYaQKgzdwVYnH_qajkzUPvfnurXpd3LtLneEq8MT_77Q2dsA";
    let bob = "sat_XCr_vaLs5OiOnYaldeYgyAyNpjP_5t8tVfVst1Ye1u6IjpHs_WaT6o7fARmyNpcNMd70jQ";
    let session = validate_with(&mut c, alice, Some(false))
        .await
        .expect("alice's session came back");
    assert_eq!(session.session_id, "932e1b0d2c68bbdfc52089ca83f2c223");
    assert_not_valid(validate(&mut c, bob).await);
    assert_eq!(list_all(&mut c, "acme", "alice", 10).await.len(), 1);
}

#[tokio::test]
async fn restore_refuses_an_occupied_directory_unless_forced_and_then_keeps_it() {
    let server = TestServer::start().await;
    create(&mut server.client().await, "t", "u").await;
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("backup.sab");
    backup::fetch(server.channel().await, None, &file)
        .await
        .expect("backup");

    let target = files.path().join("data");
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(target.join("precious.txt"), b"keep me").expect("write");
    let err = backup::restore(&file, &target, false).expect_err("occupied");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert!(target.join("precious.txt").exists());

    backup::restore(&file, &target, true).expect("forced");
    let aside = files.path().join("data.before-restore");
    assert_eq!(
        std::fs::read(aside.join("precious.txt")).expect("kept"),
        b"keep me"
    );
    assert!(target.join("store.id").exists());
}

#[tokio::test]
async fn a_damaged_backup_is_refused_before_anything_is_written() {
    let server = TestServer::start().await;
    create(&mut server.client().await, "t", "u").await;
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("backup.sab");
    backup::fetch(server.channel().await, None, &file)
        .await
        .expect("backup");
    let mut bytes = std::fs::read(&file).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, &bytes).expect("write");
    let target = files.path().join("data");
    let err = backup::restore(&file, &target, false).expect_err("damaged");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(!target.exists(), "nothing written");
    std::fs::write(&file, &bytes[..bytes.len() / 3]).expect("truncate");
    assert!(backup::restore(&file, &target, false).is_err());
}

#[tokio::test]
async fn only_an_unbound_admin_may_take_a_backup() {
    let server = TestServer::start_with(Config {
        api_keys: vec![
            api_key("ops", "ops", Role::Admin, None),
            api_key("acme-ops", "acme-ops", Role::Admin, Some("acme")),
            api_key("web", "web", Role::Service, None),
        ],
        ..test_config()
    })
    .await;
    let files = tempfile::tempdir().expect("tempdir");
    let out = files.path().join("b.sab");
    for (secret, code) in [
        ("web", "PermissionDenied"),
        ("acme-ops", "PermissionDenied"),
    ] {
        let err = backup::fetch(server.channel().await, Some(secret), &out)
            .await
            .expect_err(secret);
        assert!(err.to_string().contains(code), "{secret}: {err}");
        assert!(!out.exists());
    }
    backup::fetch(server.channel().await, Some("ops"), &out)
        .await
        .expect("admin");
}

#[tokio::test]
async fn the_cli_backs_up_and_restores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = spawn_binary(&dir.path().join("data"), &[]).await;
    let token = create(&mut connect(&addr).await, "t", "u").await.token;
    let bin = env!("CARGO_BIN_EXE_session-authority");
    let file = dir.path().join("b.sab");
    let out = std::process::Command::new(bin)
        .args(["backup", "--server", &format!("http://{addr}"), "--out"])
        .arg(&file)
        .output()
        .expect("run backup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    child.start_kill().expect("kill");
    child.wait().await.expect("reaped");
    // Into the live data directory: refused, exit code 1.
    let out = std::process::Command::new(bin)
        .args(["restore", "--from"])
        .arg(&file)
        .arg("--into")
        .arg(dir.path().join("data"))
        .output()
        .expect("run restore");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    // Into a new one: a server on it knows the session.
    let out = std::process::Command::new(bin)
        .args(["restore", "--from"])
        .arg(&file)
        .arg("--into")
        .arg(dir.path().join("restored"))
        .output()
        .expect("run restore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_child, addr) = spawn_binary(&dir.path().join("restored"), &[]).await;
    validate(&mut connect(&addr).await, &token)
        .await
        .expect("restored");
}
