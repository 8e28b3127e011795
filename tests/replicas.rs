//! Several replicas of the service on one etcd cluster (3 members on loopback), over real gRPC:
//! they share sessions, revocations, limits and one event log.

mod common;
#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::{sync::Arc, time::Duration};

use common::{assert_not_valid, create, create_request, test_config, validate, TestServer, START};
use etcd_cluster::EtcdCluster;
use session_authority::{
    clock::ManualClock,
    config::{Config, StoreKind},
    model::policy::LimitAction,
    proto::v1::{self as pb, event_service_client::EventServiceClient, watch_events_response},
};
use tokio_stream::StreamExt;

fn replica_config(cluster: &EtcdCluster, prefix: &str) -> Config {
    Config {
        store: StoreKind::Etcd,
        etcd_endpoints: cluster.endpoints(),
        etcd_prefix: prefix.into(),
        ..test_config()
    }
}

/// Two replicas on one cluster, sharing a clock.
async fn two_replicas(config: Config) -> (TestServer, TestServer) {
    let clock = Arc::new(ManualClock::new(START));
    let a = TestServer::start_in(
        Arc::new(tempfile::tempdir().expect("dir")),
        clock.clone(),
        config.clone(),
    )
    .await;
    let b = TestServer::start_in(Arc::new(tempfile::tempdir().expect("dir")), clock, config).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_replica_is_refused_at_once_by_the_other() {
    let cluster = EtcdCluster::start(3);
    let (a, b) = two_replicas(replica_config(&cluster, "/replicas/")).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    for round in 0..20 {
        let created = create(&mut on_a, "t", &format!("u{round}")).await;
        let session = created.session.expect("session");
        // Created on A: B validates it at once.
        validate(&mut on_b, &created.token)
            .await
            .expect("valid on B");
        // Revoked on B: A refuses it in the very next call.
        on_b.revoke_session(pb::RevokeSessionRequest {
            session_id: session.session_id.clone(),
            reason: 0,
        })
        .await
        .expect("revoke on B");
        assert_not_valid(validate(&mut on_a, &created.token).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_over_two_replicas_never_exceed_the_limit() {
    let cluster = EtcdCluster::start(3);
    let config = Config {
        max_sessions_per_user: 3,
        limit_action: LimitAction::Reject,
        ..replica_config(&cluster, "/limit/")
    };
    let (a, b) = two_replicas(config).await;
    let (on_a, on_b) = (a.client().await, b.client().await);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let mut client = if i % 2 == 0 {
                on_a.clone()
            } else {
                on_b.clone()
            };
            tokio::spawn(async move { client.create_session(create_request("t", "u")).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => created += 1,
            Err(s) => assert_exhausted(&s),
        }
    }
    assert_eq!(created, 3, "exactly the limit, across both replicas");
}

/// Both replicas' streams carry the same events in the same order, whichever replica wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_both_replicas_receive_identical_streams() {
    let cluster = EtcdCluster::start(3);
    let (a, b) = two_replicas(replica_config(&cluster, "/watch/")).await;
    let stream_a =
        common::watch_from(EventServiceClient::new(a.channel().await), Some(0), false).await;
    let stream_b =
        common::watch_from(EventServiceClient::new(b.channel().await), Some(0), false).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    for i in 0..10 {
        let client = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let created = create(client, "t", &format!("u{i}")).await;
        client
            .revoke_session(pb::RevokeSessionRequest {
                session_id: created.session.expect("session").session_id,
                reason: 0,
            })
            .await
            .expect("revoke");
    }
    let take = |stream: tonic::Streaming<pb::WatchEventsResponse>| async move {
        let events: Vec<(u64, String, String)> = stream
            .filter_map(|m| match m.expect("message").message {
                Some(watch_events_response::Message::Event(e)) => {
                    Some((e.sequence, e.session_id.clone(), format!("{:?}", e.body)))
                }
                _ => None,
            })
            .take(20)
            .timeout(Duration::from_secs(10))
            .map(|e| e.expect("20 events within 10 s"))
            .collect()
            .await;
        events
    };
    let (seen_a, seen_b) = tokio::join!(take(stream_a), take(stream_b));
    assert_eq!(seen_a, seen_b);
    let sequences: Vec<u64> = seen_a.iter().map(|e| e.0).collect();
    assert_eq!(sequences, (1..=20).collect::<Vec<_>>(), "dense, in order");
}

/// A replica whose copy lags (its watch held) must not answer a validate from it: the read fence
/// waits for the copy to catch up with etcd, and without quorum or progress fails UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_never_validates_a_session_revoked_elsewhere() {
    use session_authority::{
        error::Error,
        model::session::RevokeReason,
        sessions::{policies::Policies, NewSession, Sessions},
        store::{EtcdOptions, EtcdStore, RevokeTarget},
        token::TokenGenerator,
    };
    let cluster = EtcdCluster::start(3);
    let clock = Arc::new(ManualClock::new(START));
    let open = || async {
        let options = EtcdOptions {
            endpoints: cluster.endpoints(),
            timeout: Duration::from_secs(5),
            ..EtcdOptions::default()
        };
        let store = Arc::new(
            EtcdStore::open(options, "/fence/", 4096, Duration::from_secs(86_400))
                .await
                .expect("open"),
        );
        let default = session_authority::model::policy::Policy::from(&test_config());
        let policies = Arc::new(Policies::load(store.clone(), default).expect("policies"));
        let sessions = Sessions::new(
            store.clone(),
            clock.clone(),
            TokenGenerator::from_os().expect("seed"),
            policies,
            Duration::from_secs(10),
        );
        (store, sessions)
    };
    let (_, a) = open().await;
    let (b_store, b) = open().await;
    let created = a
        .create(NewSession {
            tenant_id: "t".into(),
            user_id: "u".into(),
            remember_me: false,
            device: Default::default(),
            attributes: Default::default(),
            binding_key: None,
        })
        .await
        .expect("create");
    let token = created.token.expose().to_string();
    b.validate(&token, false, None, None)
        .await
        .expect("valid on B");

    b_store.hold_watch(true);
    a.revoke(
        RevokeTarget::Sessions {
            ids: vec![created.session.id],
            tenant: None,
        },
        RevokeReason::Admin,
    )
    .await
    .expect("revoke on A");
    let lagging = b.validate(&token, false, None, None).await;
    assert!(
        matches!(lagging, Err(Error::Storage(_))),
        "a lagging copy must not answer: {lagging:?}"
    );

    b_store.hold_watch(false);
    let caught_up = b.validate(&token, false, None, None).await;
    assert!(
        matches!(caught_up, Err(Error::SessionNotValid)),
        "{caught_up:?}"
    );
}

/// The way from one machine to a cluster: a backup of a running sled server, restored by the CLI
/// into an empty etcd prefix, serves the same sessions from a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_moves_a_sled_store_into_etcd() {
    use common::{connect, spawn_binary};
    let cluster = EtcdCluster::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut sled_server, addr) = spawn_binary(&dir.path().join("data"), &[]).await;
    let token = create(&mut connect(&addr).await, "t", "u").await.token;
    let bin = env!("CARGO_BIN_EXE_session-authority");
    let file = dir.path().join("b.sab");
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let file_arg = file.display().to_string();
    run(vec![
        "backup".into(),
        "--server".into(),
        format!("http://{addr}"),
        "--out".into(),
        file_arg.clone(),
    ]);
    sled_server.start_kill().expect("kill");
    let endpoints = cluster.endpoints().join(",");
    let etcd_args = vec![
        "--store".to_string(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        endpoints,
        "--etcd-prefix".into(),
        "/moved/".into(),
    ];
    let restore = |extra: &[&str]| {
        let mut args = etcd_args.clone();
        args.extend(["restore", "--from", &file_arg].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let said = run(restore(&["--to-etcd"]));
    assert!(said.contains("restored"), "{said}");
    // A second restore into the same prefix is refused: it holds a store now.
    let again = std::process::Command::new(bin)
        .args(restore(&["--to-etcd"]))
        .output()
        .expect("run");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a store"));

    let args: Vec<&str> = etcd_args.iter().map(String::as_str).collect();
    let (_replica, addr) = spawn_binary(&dir.path().join("unused"), &args).await;
    validate(&mut connect(&addr).await, &token)
        .await
        .expect("the session moved to etcd");
}

/// Killing the member a replica talks to (quorum intact) loses nothing acknowledged, and the
/// replica goes on serving through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_an_etcd_member_loses_nothing_acknowledged() {
    let mut cluster = EtcdCluster::start(3);
    let server = TestServer::start_with(replica_config(&cluster, "/failover/")).await;
    let mut client = server.client().await;
    let mut tokens = Vec::new();
    for i in 0..10 {
        tokens.push(create(&mut client, "t", &format!("before{i}")).await.token);
    }
    // The first endpoint is the one calls start on.
    cluster.kill(0);
    let mut refused = 0;
    for i in 0..30 {
        match client
            .create_session(create_request("t", &format!("after{i}")))
            .await
        {
            Ok(r) => tokens.push(r.into_inner().token),
            // A write caught by the kill may fail (UNAVAILABLE), never be acknowledged and lost.
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                refused += 1;
            }
        }
    }
    assert!(
        refused <= 3,
        "the replica fails over at once ({refused} refused)"
    );
    for token in &tokens {
        validate(&mut client, token)
            .await
            .expect("acknowledged, kept");
    }
    cluster.restart(0);
}

/// A policy set through one replica is in force on the other for its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_on_one_replica_applies_on_the_other_at_once() {
    use session_authority::proto::v1::policy_service_client::PolicyServiceClient;
    let cluster = EtcdCluster::start(3);
    let (a, b) = two_replicas(replica_config(&cluster, "/policy/")).await;
    let mut on_b = b.client().await;
    // B reads the default first, so it has the old policy cached.
    create(&mut on_b, "t", "u").await;
    PolicyServiceClient::new(a.channel().await)
        .set_policy(pb::SetPolicyRequest {
            policy: Some(pb::Policy {
                tenant_id: "t".into(),
                max_sessions_per_user: 1,
                limit_action: pb::LimitAction::Reject as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["max_sessions_per_user".into(), "limit_action".into()],
            }),
        })
        .await
        .expect("set on A");
    let refused = on_b
        .create_session(create_request("t", "u"))
        .await
        .expect_err("B follows A's policy: one session, REJECT");
    assert_exhausted(&refused);
}

/// One replica at a time runs the background work; when it stops, another takes over within
/// seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_runs_the_background_work_and_another_takes_over() {
    use session_authority::store::{EtcdOptions, EtcdStore, SessionStore};
    let cluster = EtcdCluster::start(3);
    let open = || async {
        let options = EtcdOptions {
            endpoints: cluster.endpoints(),
            timeout: Duration::from_secs(5),
            ..EtcdOptions::default()
        };
        EtcdStore::open(options, "/leader/", 4096, Duration::from_secs(86_400))
            .await
            .expect("open")
    };
    let stores = [open().await, open().await, open().await];
    let leaders = || stores.iter().filter(|s| s.runs_background_work()).count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while leaders() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        assert_eq!(leaders(), 1, "never two at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = stores
        .iter()
        .position(|s| s.runs_background_work())
        .expect("a leader");
    stores[leader].close().await.expect("close");
    let others = || {
        stores
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != leader && s.runs_background_work())
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while others() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "nobody took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Health follows etcd's quorum: NOT_SERVING while it is lost (and writes fail UNAVAILABLE),
/// SERVING again by itself once it returns, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_quorum_of_etcd() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let mut cluster = EtcdCluster::start(3);
    let server = TestServer::start_with(replica_config(&cluster, "/health/")).await;
    let health = HealthClient::new(server.channel().await);
    let status = |want: ServingStatus| {
        let health = health.clone();
        move || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest::default())
                    .await
                    .map(|r| r.into_inner().status())
                    .ok()
                    == Some(want)
            }
        }
    };
    let mut client = server.client().await;
    create(&mut client, "t", "before").await;
    cluster.kill(1);
    cluster.kill(2);
    // Within seconds: a probe of etcd every 500 ms, failing after 1.5 s without quorum.
    let limit = Duration::from_secs(10);
    common::eventually_within(
        "NOT_SERVING without quorum",
        limit,
        status(ServingStatus::NotServing),
    )
    .await;
    let refused = client
        .create_session(create_request("t", "during"))
        .await
        .expect_err("no quorum, no write");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    cluster.restart(1);
    cluster.restart(2);
    common::eventually_within(
        "SERVING once quorum returns",
        limit,
        status(ServingStatus::Serving),
    )
    .await;
    create(&mut client, "t", "after").await;
}

/// A subscriber whose replica dies (kill -9) resumes on another with its cursor and epoch: the
/// same log, no gap, no duplicate; and the surviving replica serves throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_resumes_on_another_replica_after_a_kill() {
    use common::{connect, connect_channel, spawn_binary};
    let cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints().join(",");
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoints,
        "--etcd-prefix",
        "/resume/",
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, addr_a) = spawn_binary(&dir.path().join("a"), &args).await;
    let (_b, addr_b) = spawn_binary(&dir.path().join("b"), &args).await;
    let mut on_b = connect(&addr_b).await;

    let mut stream = common::watch_from(
        EventServiceClient::new(connect_channel(&addr_a).await),
        Some(0),
        false,
    )
    .await;
    for i in 0..5 {
        create(&mut on_b, "t", &format!("before{i}")).await;
    }
    let (mut cursor, mut epoch) = (0, 0);
    while cursor < 5 {
        let message = stream.message().await.expect("stream").expect("open");
        if let Some(watch_events_response::Message::Event(e)) = message.message {
            assert_eq!(e.sequence, cursor + 1, "in order, no gap");
            (cursor, epoch) = (e.sequence, e.log_epoch);
        }
    }
    a.start_kill().expect("kill -9");
    a.wait().await.expect("reaped");
    for i in 0..5 {
        create(&mut on_b, "t", &format!("after{i}")).await;
    }
    let mut resumed = EventServiceClient::new(connect_channel(&addr_b).await)
        .watch_events(pb::WatchEventsRequest {
            after_sequence: Some(cursor),
            filter: None,
            announce_live: false,
            log_epoch: Some(epoch),
        })
        .await
        .expect("resume on B with A's cursor and epoch")
        .into_inner();
    while cursor < 10 {
        let message = tokio::time::timeout(Duration::from_secs(10), resumed.message())
            .await
            .expect("events within 10 s")
            .expect("stream")
            .expect("open");
        if let Some(watch_events_response::Message::Event(e)) = message.message {
            assert_eq!(e.sequence, cursor + 1, "no gap, no duplicate");
            assert_eq!(e.log_epoch, epoch, "one log");
            cursor = e.sequence;
        }
    }
}

/// Audit records appended through two replicas at once get distinct ids, 1 to n, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_ids_are_unique_across_replicas() {
    use session_authority::{
        clock::Timestamp,
        model::audit::AuditEntry,
        store::{EtcdOptions, EtcdStore, SessionStore},
    };
    let cluster = EtcdCluster::start(3);
    let open = || async {
        let options = EtcdOptions {
            endpoints: cluster.endpoints(),
            timeout: Duration::from_secs(5),
            ..EtcdOptions::default()
        };
        Arc::new(
            EtcdStore::open(options, "/audit/", 4096, Duration::from_secs(86_400))
                .await
                .expect("open"),
        )
    };
    let (a, b) = (open().await, open().await);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .append_audit(AuditEntry {
                        id: 0,
                        at: Timestamp::from_millis(1),
                        caller: "ops".into(),
                        role: "admin".into(),
                        action: format!("action {i}"),
                        tenant_id: None,
                        detail: String::new(),
                    })
                    .await
                    .expect("append")
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=40).collect::<Vec<u64>>());
    // Each replica's copy shows all of them once its watch has the other's last append.
    let stored = || -> Vec<u64> {
        a.audit_after(0, 100)
            .expect("audit")
            .iter()
            .map(|e| e.id)
            .collect()
    };
    common::eventually("A's copy has every record", || async {
        stored().len() == 40
    })
    .await;
    assert_eq!(stored(), (1..=40).collect::<Vec<u64>>());
}

/// Fills a store through `client` with sessions of the largest attributes until etcd refuses one
/// (NOSPACE); that refusal.
async fn fill(
    client: &mut pb::session_service_client::SessionServiceClient<tonic::transport::Channel>,
) -> tonic::Status {
    let big = |i: usize| pb::CreateSessionRequest {
        attributes: (0..16)
            .map(|k| {
                (
                    format!("{k:02}{}", "k".repeat(62)),
                    format!("{i}{}", "v".repeat(250)),
                )
            })
            .collect(),
        ..create_request("t", &format!("filler{i}"))
    };
    for i in 0..5_000 {
        if let Err(s) = client.create_session(big(i)).await {
            return s;
        }
    }
    panic!("etcd filled up within 5,000 creations");
}

/// While etcd is full, a session in use is not logged out as idle: its uses wait in the
/// replica's memory, to be written when etcd has space (once, a failed write of them dropped
/// them, and the session was refused as idle an idle timeout after its last written use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_use_outlives_its_idle_timeout_while_etcd_is_full() {
    let cluster = EtcdCluster::start_with_quota(1, 2 * 1024 * 1024);
    let server = TestServer::start_with(replica_config(&cluster, "/busy/")).await;
    let mut client = server.client().await;
    let user = create(&mut client, "t", "user").await;
    assert_exhausted(&fill(&mut client).await);
    // Used every half idle timeout (600 s), for two idle timeouts, each use's write failing
    // (the replica tries every half second).
    for i in 1..=4 {
        server.advance(Duration::from_secs(300));
        validate(&mut client, &user.token)
            .await
            .unwrap_or_else(|e| panic!("in use at {} s: {e}", i * 300));
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
}

/// A full etcd (NOSPACE alarm: it takes reads and deletes only) refuses creations with a message
/// that says so, and never stops a logout: revocations through either replica still end the
/// sessions for both at once, and their events reach subscribers, in order and without holes,
/// once an operator frees space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_etcd_refuses_creations_and_still_revokes() {
    use session_authority::store::{etcd, EtcdOptions};
    let cluster = EtcdCluster::start_with_quota(3, 2 * 1024 * 1024);
    let (a, b) = two_replicas(replica_config(&cluster, "/full/")).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let first = create(&mut on_a, "t", "victim").await;
    let second = create(&mut on_a, "t", "victim").await;
    let bystander = create(&mut on_b, "t", "bystander").await;
    let head = second.sequence.max(bystander.sequence);
    let events = common::watch_from(
        EventServiceClient::new(b.channel().await),
        Some(head),
        false,
    )
    .await;

    let refused = fill(&mut on_a).await;
    assert_exhausted(&refused);
    assert!(refused.message().contains("out of space"), "{refused:?}");
    let on_b_too = on_b
        .create_session(create_request("t", "late"))
        .await
        .expect_err("full for B too");
    assert_exhausted(&on_b_too);

    // A logout on B: both replicas refuse the session at once; the bystander is untouched.
    let first_id = first.session.expect("session").session_id;
    on_b.revoke_session(pb::RevokeSessionRequest {
        session_id: first_id.clone(),
        reason: pb::RevokeReason::UserLogout as i32,
    })
    .await
    .expect("a logout works on a full store");
    assert_not_valid(validate(&mut on_a, &first.token).await);
    assert_not_valid(validate(&mut on_b, &first.token).await);
    validate(&mut on_a, &bystander.token)
        .await
        .expect("others stay valid");
    // Said again: the same answer, not NOT_FOUND.
    on_b.revoke_session(pb::RevokeSessionRequest {
        session_id: first_id.clone(),
        reason: pb::RevokeReason::UserLogout as i32,
    })
    .await
    .expect("a repeated logout is answered the same");
    // Everywhere, on A: the user's other session ends too.
    let everywhere = on_a
        .revoke_user_sessions(pb::RevokeUserSessionsRequest {
            tenant_id: "t".into(),
            user_id: "victim".into(),
            ..Default::default()
        })
        .await
        .expect("log out everywhere works on a full store")
        .into_inner();
    let second_id = second.session.expect("session").session_id;
    assert_eq!(everywhere.revoked_session_ids, vec![second_id.clone()]);
    assert_not_valid(validate(&mut on_b, &second.token).await);

    // The operator frees space; the revocations' events follow, right after what came before.
    etcd::free_space(&EtcdOptions {
        endpoints: cluster.endpoints(),
        ..EtcdOptions::default()
    })
    .await
    .expect("compact, defragment, disarm");
    let logged: Vec<(u64, String, String)> = events
        .filter_map(|m| match m.expect("message").message {
            Some(watch_events_response::Message::Event(e)) => {
                Some((e.sequence, e.session_id.clone(), format!("{:?}", e.body)))
            }
            _ => None,
        })
        .filter(|e| e.1 == first_id || e.1 == second_id)
        .take(2)
        .timeout(Duration::from_secs(20))
        .map(|e| e.expect("the revocations' events within 20 s of freeing space"))
        .collect()
        .await;
    // Each replica writes its own when space returns: the order across replicas is theirs.
    let reason_of = |id: &str| logged.iter().find(|e| e.1 == id).map(|e| e.2.clone());
    assert!(
        reason_of(&first_id).is_some_and(|b| b.contains("reason: UserLogout")),
        "{logged:?}"
    );
    assert!(
        reason_of(&second_id).is_some_and(|b| b.contains("reason: Admin")),
        "{logged:?}"
    );
    let last = logged[0].0.max(logged[1].0);
    // The log has no holes and no duplicates: every sequence after the head, each once.
    let mut replay = common::watch_from(
        EventServiceClient::new(a.channel().await),
        Some(head),
        false,
    )
    .await;
    let mut sequences = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), replay.next()).await {
        if let Some(watch_events_response::Message::Event(e)) = m.expect("message").message {
            sequences.push(e.sequence);
            if e.sequence == last {
                break;
            }
        }
    }
    assert_eq!(sequences, (head + 1..=last).collect::<Vec<_>>());
    // The audit trail has the admin's revocation made while full. A waits for space to write
    // it, after the revocation's events, and B sees it once its copy has the commit.
    let auditor = pb::audit_service_client::AuditServiceClient::new(b.channel().await);
    common::eventually_within(
        "the revocation made while full, in B's audit trail",
        Duration::from_secs(10),
        || {
            let mut auditor = auditor.clone();
            async move {
                let audit = auditor
                    .list_audit_records(pb::ListAuditRecordsRequest::default())
                    .await
                    .expect("audit")
                    .into_inner();
                audit
                    .records
                    .iter()
                    .any(|r| r.action == "RevokeUserSessions" && r.detail.contains("victim"))
            }
        },
    )
    .await;
    // And creations work again.
    eventually_creates(&mut on_a).await;
}

fn assert_exhausted(status: &tonic::Status) {
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}

async fn eventually_creates(
    client: &mut pb::session_service_client::SessionServiceClient<tonic::transport::Channel>,
) {
    for _ in 0..100 {
        if client
            .create_session(create_request("t", "after"))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("creations did not work again after space was freed");
}
