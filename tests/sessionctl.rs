//! `sessionctl` against a real server: tables, JSON lines, and the exit codes scripts rely on.

mod common;
#[path = "common/dbsc.rs"]
mod dbsc;

use common::*;
use serde_json::Value;
use session_authority::config::{Config, Role};
use session_authority::proto::v1 as pb;

/// Runs the CLI without blocking the runtime the in-process server runs on.
async fn sessionctl(
    server: &TestServer,
    args: &[&str],
    key: Option<&str>,
) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessionctl"));
    cmd.arg("--server")
        .arg(format!("http://{}", server.addr))
        .args(args);
    cmd.env_remove("SESSION_AUTHORITY_API_KEY");
    if let Some(key) = key {
        cmd.env("SESSION_AUTHORITY_API_KEY", key);
    }
    let out = cmd.output().await.expect("run sessionctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test]
async fn list_show_revoke_and_watch() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let a = create(&mut client, "acme", "alice").await;
    create(&mut client, "acme", "bob").await;
    let id = a.session.expect("s").session_id;

    let (code, out, _) = sessionctl(&server, &["--json", "list", "--tenant", "acme"], None).await;
    assert_eq!(code, 0);
    let rows = lines(&out);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["user_id"], "alice");
    let (code, out, _) = sessionctl(
        &server,
        &["list", "--tenant", "acme", "--user", "bob"],
        None,
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .next()
            .expect("header")
            .starts_with("SESSION_ID"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 2);

    let (code, out, _) = sessionctl(&server, &["--json", "show", &id], None).await;
    assert_eq!(code, 0);
    assert_eq!(lines(&out)[0]["state"], "SESSION_STATE_ACTIVE");
    assert_eq!(lines(&out)[0]["bound"], false);

    let (code, out, _) = sessionctl(
        &server,
        &["--json", "revoke", &id, "--reason", "user-logout"],
        None,
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(lines(&out)[0]["revoked"], true);
    assert_not_valid(validate(&mut client, &a.token).await);

    let (code, out, _) = sessionctl(
        &server,
        &["--json", "watch", "--from", "0", "--count", "3"],
        None,
    )
    .await;
    assert_eq!(code, 0);
    let kinds: Vec<_> = lines(&out)
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_string())
        .collect();
    assert_eq!(kinds, ["created", "created", "revoked"]);

    let (code, out, _) = sessionctl(
        &server,
        &[
            "--json",
            "revoke-matching",
            "--tenant",
            "acme",
            "--older-than",
            "0s",
            "--dry-run",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(lines(&out)[0]["matched"], 1);
}

#[tokio::test]
async fn exit_codes_say_what_went_wrong() {
    let server = TestServer::start_with(Config {
        api_keys: vec![api_key("ops", "ops-key", Role::Admin, None)],
        ..test_config()
    })
    .await;
    let (code, _, err) = sessionctl(&server, &["list", "--tenant", "acme"], None).await;
    assert_eq!(code, 4, "no key: {err}");
    let (code, _, err) = sessionctl(
        &server,
        &["show", "00000000000000000000000000000000"],
        Some("ops-key"),
    )
    .await;
    assert_eq!(code, 3, "unknown id: {err}");
    let (code, _, err) = sessionctl(&server, &["show", "not-an-id"], Some("ops-key")).await;
    assert_eq!(code, 5, "bad id: {err}");
    assert!(err.contains("session_id"), "{err}");
    let (code, out, _) = sessionctl(&server, &["stats", "--tenant", "acme"], Some("ops-key")).await;
    assert_eq!(code, 0);
    assert!(out.contains("live_sessions"));
}

#[tokio::test]
async fn revoke_matching_revokes_every_match_page_by_page() {
    let server = TestServer::start().await;
    let mut sessions = server.client().await;
    for i in 0..7 {
        create(&mut sessions, "acme", &format!("u{i}")).await;
    }
    let other = create(&mut sessions, "globex", "u0").await;
    let (code, out, err) = sessionctl(
        &server,
        &[
            "--json",
            "revoke-matching",
            "--tenant",
            "acme",
            "--older-than",
            "0s",
            "--batch-size",
            "3",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let report = &lines(&out)[0];
    assert_eq!(report["matched"], 7);
    assert_eq!(report["dry_run"], false);
    assert!(list_all(&mut sessions, "acme", "", 100).await.is_empty());
    assert_eq!(
        list_all(&mut sessions, "globex", "", 100).await.len(),
        1,
        "another tenant's session is untouched: {}",
        other.session.expect("session").session_id
    );
    // A zero batch is a usage error.
    let (code, _, _) = sessionctl(
        &server,
        &[
            "revoke-matching",
            "--tenant",
            "acme",
            "--older-than",
            "0s",
            "--batch-size",
            "0",
        ],
        None,
    )
    .await;
    assert_eq!(code, 2);
}

#[tokio::test]
async fn policy_set_changes_only_the_settings_given() {
    let server = TestServer::start().await;
    let (code, out, err) = sessionctl(
        &server,
        &[
            "--json",
            "policy",
            "set",
            "acme",
            "--max-sessions-per-user",
            "3",
            "--idle-timeout",
            "30m",
            "--limit-action",
            "reject",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let set = &lines(&out)[0];
    assert_eq!(set["max_sessions_per_user"], 3);
    assert_eq!(set["idle_timeout"], "1800s");
    assert_eq!(set["limit_action"], "LIMIT_ACTION_REJECT");
    let (code, out, _) = sessionctl(
        &server,
        &["--json", "policy", "set", "acme", "--travel-action", "flag"],
        None,
    )
    .await;
    assert_eq!(code, 0);
    let (code, out2, _) = sessionctl(&server, &["--json", "policy", "get", "acme"], None).await;
    assert_eq!(code, 0);
    for got in [&lines(&out)[0], &lines(&out2)[0]] {
        assert_eq!(got["travel_action"], "TRAVEL_ACTION_FLAG");
        assert_eq!(got["max_sessions_per_user"], 3, "earlier change kept");
        assert_eq!(got["idle_timeout"], "1800s");
    }
    assert_eq!(lines(&out2)[0]["is_default"], false);
    // The server's checks reach the operator as exit code 5 with the field named.
    let (code, _, err) = sessionctl(
        &server,
        &["policy", "set", "acme", "--idle-timeout", "0s"],
        None,
    )
    .await;
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("idle_timeout"), "{err}");
}

#[tokio::test]
async fn show_prints_flags_and_binding() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // A device-bound session, and one whose replaced token came back.
    let bound = client
        .create_session(pb::CreateSessionRequest {
            binding_key: dbsc::key_pair(4).1,
            ..create_request("acme", "carol")
        })
        .await
        .expect("bound")
        .into_inner();
    let bound_id = bound.session.expect("s").session_id;
    let (_, out, _) = sessionctl(&server, &["--json", "show", &bound_id], None).await;
    assert_eq!(lines(&out)[0]["bound"], true);
    assert_ne!(lines(&out)[0]["bound_token_expires_at"], "");
    let plain = create(&mut client, "acme", "dave").await;
    let plain_id = plain.session.expect("s").session_id;
    client
        .rotate_session(pb::RotateSessionRequest {
            token: plain.token.clone(),
            ..Default::default()
        })
        .await
        .expect("rotate");
    server.advance(std::time::Duration::from_secs(11));
    assert_not_valid(validate(&mut client, &plain.token).await);
    let mut flags = serde_json::Value::Null;
    for _ in 0..300 {
        let (_, out, _) = sessionctl(&server, &["--json", "show", &plain_id], None).await;
        flags = lines(&out)[0]["flags"].clone();
        if flags != "" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(flags, "TOKEN_REUSE");
}
