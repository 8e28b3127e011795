//! Stores written by an earlier release open in this one, keeping every session, ended or live,
//! with its last use, and take touches in today's format from then on.
//! - Format 3 added last uses apart from the records, one key per session; format 2 had none and
//!   is only marked anew at open. Its fixture, `tests/fixtures/store-format-2/`, was written by
//!   the release before format 3 (commit 00ae628).
//! - Format 4 keeps last uses in rounds (`store::touch_log`); format 3's keys are moved into
//!   rounds at open. Its fixture, `tests/fixtures/store-format-3/`, was written by the release
//!   before format 4 (commit 0e91a6f), and holds a session whose last use is in such a key.
//!
//! - Format 5 keeps a user's per-user records (last place, recent logins, login quota) at the end
//!   of the user's range of the user index instead of in maps of their own; format 4's are moved
//!   at open. Its fixture, `tests/fixtures/store-format-4/`, was written by the release before
//!   format 5 (commit 6e581af), with a place, a platform and a quota for every login.
//!
//! All were written with `make_fixture` below.

mod common;

use std::{path::Path, sync::Arc, time::Duration};

use common::{connect, test_config, validate_with, TestServer};
use session_authority::{clock::ManualClock, clock::Timestamp, proto::v1 as pb};

const FORMAT_2: &str = "tests/fixtures/store-format-2";
const FORMAT_3: &str = "tests/fixtures/store-format-3";
const FORMAT_4: &str = "tests/fixtures/store-format-4";
/// What the fixture's server ran with (the test's server runs the same, on a manual clock set to
/// when the fixture was written, so its sessions never expire with the calendar).
const SETTINGS: [&str; 6] = [
    "--idle-timeout",
    "10m",
    "--absolute-timeout",
    "1h",
    "--touch-interval",
    "10s",
];
/// What the fixtures since format 4 were written with besides `SETTINGS`, so that every user has
/// a login quota record.
const QUOTA: [&str; 2] = ["--max-creations-per-day", "3"];
/// Where the fixtures since format 4 logged in from, so that every user has a last place.
fn bangkok() -> pb::Location {
    pb::Location {
        country: "TH".into(),
        city: "Bangkok".into(),
        latitude: Some(13.75),
        longitude: Some(100.5),
    }
}

/// One line of the fixture's `sessions.txt` (after its first line, the time it was written):
/// token, session id, state, last use (millis).
struct Written {
    token: String,
    id: String,
    live: bool,
    last_seen_ms: i64,
}

fn written(fixture: &str) -> (Timestamp, Vec<Written>) {
    let text = std::fs::read_to_string(Path::new(fixture).join("sessions.txt")).expect("fixture");
    let mut lines = text.lines();
    let at = lines.next().expect("time line").parse().expect("millis");
    let sessions = lines
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Written {
                token: f[0].into(),
                id: f[1].into(),
                live: f[2] == "live",
                last_seen_ms: f[3].parse().expect("millis"),
            }
        })
        .collect();
    (Timestamp::from_millis(at), sessions)
}

fn millis(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

async fn check(server: &TestServer, sessions: &[Written]) {
    let mut client = server.client().await;
    for s in sessions {
        let got = validate_with(&mut client, &s.token, Some(false)).await;
        match (s.live, got) {
            (true, Ok(session)) => {
                assert_eq!(session.session_id, s.id);
                assert!(
                    millis(&session.last_seen_at) >= s.last_seen_ms,
                    "{}: last use went back",
                    s.id
                );
            }
            (false, Err(status)) => assert_eq!(status.code(), tonic::Code::Unauthenticated),
            (live, got) => panic!("{}: written live={live}, now {got:?}", s.id),
        }
    }
}

/// A server on a copy of `fixture`, run as the fixture's was (`SETTINGS`, and `quota`), on a
/// manual clock at the time it was written.
async fn serve_copy(fixture: &str, quota: u32) -> TestServer {
    let (written_at, _) = written(fixture);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    copy_dir(&Path::new(fixture).join("data"), &dir.path().join("data"));
    let clock = Arc::new(ManualClock::new(written_at));
    let config = session_authority::config::Config {
        idle_timeout: Duration::from_secs(600),
        absolute_timeout: Duration::from_secs(3600),
        touch_interval: Duration::from_secs(10),
        max_creations_per_day: quota,
        ..test_config()
    };
    TestServer::start_in(dir, clock, config).await
}

/// Opens a copy of `fixture` and checks every session, touches one, and checks again after a
/// restart.
async fn opens_with_every_session_and_last_use(fixture: &str) {
    let (_, sessions) = written(fixture);
    assert!(sessions.iter().any(|s| s.live) && sessions.iter().any(|s| !s.live));
    let server = serve_copy(fixture, 0).await;
    check(&server, &sessions).await;
    // A touch in today's format is kept across a restart.
    server.advance(Duration::from_secs(60));
    let live = sessions.iter().find(|s| s.live).expect("a live session");
    let mut client = server.client().await;
    let touched = validate_with(&mut client, &live.token, Some(true))
        .await
        .expect("valid");
    let server = server.restart().await;
    check(&server, &sessions).await;
    let mut client = server.client().await;
    let after = validate_with(&mut client, &live.token, Some(false))
        .await
        .expect("valid after a restart");
    assert_eq!(
        millis(&after.last_seen_at),
        millis(&touched.last_seen_at),
        "the touch was kept"
    );
}

#[tokio::test]
async fn a_format_2_store_opens_with_every_session_and_last_use() {
    opens_with_every_session_and_last_use(FORMAT_2).await;
}

/// The fixture's touched session has its last use only in format 3's key: a migration that lost
/// it would show the session's creation instead ("last use went back").
#[tokio::test]
async fn a_format_3_store_opens_with_every_session_and_last_use() {
    let (_, sessions) = written(FORMAT_3);
    let touched = &sessions[2];
    assert!(
        touched.live && touched.last_seen_ms > sessions[0].last_seen_ms + 10_000,
        "the fixture has a session touched ten seconds after it was created"
    );
    opens_with_every_session_and_last_use(FORMAT_3).await;
}

/// The fixture's users keep their last place, recent logins and login quota: a store that lost
/// them would see nothing new in a login from another platform and country, no impossible
/// travel, and no quota reached.
#[tokio::test]
async fn a_format_4_store_keeps_every_users_records() {
    opens_with_every_session_and_last_use(FORMAT_4).await;

    let server = serve_copy(FORMAT_4, 3).await;
    let mut client = server.client().await;
    let london = pb::Device {
        ip: "198.51.100.9".into(),
        user_agent: "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0 Safari/537.36".into(),
        location: Some(pb::Location {
            country: "GB".into(),
            city: "London".into(),
            latitude: Some(51.5),
            longitude: Some(-0.12),
        }),
        ..Default::default()
    };
    let create = |user: &str| pb::CreateSessionRequest {
        tenant_id: "acme".into(),
        user_id: user.into(),
        device: Some(london.clone()),
        ..Default::default()
    };
    let created = client
        .create_session(create("user-0"))
        .await
        .expect("the third login of the day")
        .into_inner()
        .session
        .expect("session");
    assert!(created.new_device, "the user's logins were kept");
    assert!(created.new_place, "the user's logins were kept");
    assert_eq!(created.flags.len(), 1, "the user's last place was kept");
    let refused = client
        .create_session(create("user-0"))
        .await
        .expect_err("the fourth login of the day");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_creations_per_day"),
        "{refused:?}"
    );
}

/// Writes a fixture with the server binary in `FORMAT_FIXTURE_SERVER` (a release that writes the
/// format to keep opening) into `FORMAT_FIXTURE_DIR`. Run by hand:
/// `FORMAT_FIXTURE_SERVER=... FORMAT_FIXTURE_DIR=tests/fixtures/store-format-N cargo test --test
/// format -- --ignored`.
#[tokio::test]
#[ignore = "writes a fixture with an earlier release's binary"]
async fn make_fixture() {
    let bin = std::env::var("FORMAT_FIXTURE_SERVER").expect("FORMAT_FIXTURE_SERVER");
    let out = std::env::var("FORMAT_FIXTURE_DIR").expect("FORMAT_FIXTURE_DIR");
    let out = Path::new(&out);
    let _ = std::fs::remove_dir_all(out);
    let data = out.join("data");
    std::fs::create_dir_all(out).expect("mkdir");
    let addr = common::free_loopback_addr().to_string();
    let mut server = tokio::process::Command::new(bin)
        .args(["--listen", &addr, "--data-dir"])
        .arg(&data)
        .args(SETTINGS)
        .args(QUOTA)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut client = connect(&addr).await;
    let mut lines = Vec::new();
    let mut created = Vec::new();
    for i in 0..6 {
        let c = client
            .create_session(pb::CreateSessionRequest {
                tenant_id: "acme".into(),
                user_id: format!("user-{}", i % 3),
                remember_me: i % 2 == 0,
                device: Some(pb::Device {
                    ip: "203.0.113.7".into(),
                    user_agent: "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0".into(),
                    location: Some(bangkok()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner();
        created.push(c);
    }
    // One revoked, one touched (a record rewrite in format 2, a last-use key in format 3).
    client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: created[1]
                .session
                .as_ref()
                .expect("session")
                .session_id
                .clone(),
            ..Default::default()
        })
        .await
        .expect("revoke");
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    validate_with(&mut client, &created[2].token, Some(true))
        .await
        .expect("touch");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    lines.push(now.to_string());
    for (i, c) in created.iter().enumerate() {
        let s = validate_with(&mut client, &c.token, Some(false)).await;
        let id = &c.session.as_ref().expect("session").session_id;
        let last = s.as_ref().map(|s| millis(&s.last_seen_at)).unwrap_or(0);
        let state = if i == 1 { "revoked" } else { "live" };
        lines.push(format!("{} {id} {state} {last}", c.token));
    }
    // Stopped as an operator stops it (SIGTERM), so the fixture is a cleanly closed store.
    let pid = server.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    server.wait().await.expect("server stopped");
    std::fs::write(out.join("sessions.txt"), lines.join("\n") + "\n").expect("write");
}
