//! A Jepsen-style crash checker. Each round runs the real server binary on a fresh directory,
//! drives a concurrent mixed workload (create, rotate, revoke, revoke-all, validate) and records
//! every call as ok, failed or unknown; kills the server with SIGKILL at a random moment;
//! restarts it on the same directory; and checks:
//!
//! - every acknowledged create still validates (with its latest acknowledged token), unless an
//!   acknowledged or unknown operation could have ended it;
//! - every acknowledged revoke and eviction stays in force; an acknowledged rotation leaves the
//!   old token dead;
//! - the event log has no holes, every acknowledged change is in it, it agrees with the stored
//!   state, and its sequence continues after the restart;
//! - no user has more live sessions than the limit; the store opened cleanly.
//!
//! The cluster rounds run the same workload over two replicas on a 3-member etcd and kill replicas,
//! etcd members or both (see `cluster_round`), then also check that both replicas serve one log.
//!
//! `CRASH_ROUNDS=300 cargo test --release --test crash -- --nocapture` runs many rounds (CI
//! runs a few); `CRASH_SEED=<seed>` replays one round's workload choices and kill moment.

mod common;
#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use etcd_cluster::EtcdCluster;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use session_authority::proto::v1::{
    self as pb, event_service_client::EventServiceClient, session_event::Body,
    session_service_client::SessionServiceClient, watch_events_response::Message,
};
use tonic::{transport::Channel, Code, Status};

const USERS: u64 = 6;
const LIMIT: usize = 3;
const WORKERS: u64 = 8;

#[derive(Debug, Clone)]
enum Outcome<T> {
    Ok(T),
    /// A definite refusal: nothing happened.
    Failed,
    /// Timeout or lost connection: it may or may not have happened.
    Unknown,
}

fn outcome<T>(r: Result<T, Status>) -> Outcome<T> {
    match r {
        Ok(v) => Outcome::Ok(v),
        Err(s) => match s.code() {
            Code::Unauthenticated | Code::NotFound | Code::InvalidArgument => Outcome::Failed,
            _ => Outcome::Unknown,
        },
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        user: String,
        result: Outcome<(String, String, Vec<String>)>,
    },
    Rotate {
        id: String,
        old: String,
        result: Outcome<String>,
    },
    Revoke {
        id: String,
        result: Outcome<()>,
    },
    RevokeAll {
        user: String,
        result: Outcome<Vec<String>>,
    },
}

impl Op {
    /// Whether it may or may not have happened.
    fn is_unknown(&self) -> bool {
        matches!(
            self,
            Op::Create {
                result: Outcome::Unknown,
                ..
            } | Op::Rotate {
                result: Outcome::Unknown,
                ..
            } | Op::Revoke {
                result: Outcome::Unknown,
                ..
            } | Op::RevokeAll {
                result: Outcome::Unknown,
                ..
            }
        )
    }
}

/// A session a worker knows of: id and the latest token it was given.
#[derive(Debug, Clone)]
struct Known {
    id: String,
    token: String,
}

struct History {
    ops: Mutex<Vec<Op>>,
    known: Mutex<Vec<Known>>,
}

async fn worker(
    mut client: SessionServiceClient<Channel>,
    history: Arc<History>,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    while !stop.load(Ordering::SeqCst) {
        let roll = rng.next_u32() % 100;
        let pick = |rng: &mut ChaCha8Rng| {
            let known = history.known.lock().expect("lock");
            (!known.is_empty()).then(|| known[rng.next_u32() as usize % known.len()].clone())
        };
        let op = if roll < 45 {
            let user = format!("u{}", rng.next_u64() % USERS);
            let r = client.create_session(create_request("crash", &user)).await;
            let result = outcome(r.map(|r| {
                let r = r.into_inner();
                (
                    r.session.expect("s").session_id,
                    r.token,
                    r.evicted_session_ids,
                )
            }));
            if let Outcome::Ok((id, token, _)) = &result {
                history.known.lock().expect("lock").push(Known {
                    id: id.clone(),
                    token: token.clone(),
                });
            }
            Op::Create { user, result }
        } else if roll < 60 {
            let Some(k) = pick(&mut rng) else { continue };
            let r = client
                .rotate_session(pb::RotateSessionRequest {
                    token: k.token.clone(),
                    ..Default::default()
                })
                .await;
            let result = outcome(r.map(|r| r.into_inner().token));
            if let Outcome::Ok(new) = &result {
                let mut known = history.known.lock().expect("lock");
                if let Some(entry) = known
                    .iter_mut()
                    .find(|e| e.id == k.id && e.token == k.token)
                {
                    entry.token = new.clone();
                }
            }
            Op::Rotate {
                id: k.id,
                old: k.token,
                result,
            }
        } else if roll < 80 {
            let Some(k) = pick(&mut rng) else { continue };
            let r = client
                .revoke_session(pb::RevokeSessionRequest {
                    session_id: k.id.clone(),
                    reason: pb::RevokeReason::UserLogout as i32,
                })
                .await;
            Op::Revoke {
                id: k.id,
                result: outcome(r.map(drop)),
            }
        } else if roll < 85 {
            let user = format!("u{}", rng.next_u64() % USERS);
            let r = client
                .revoke_user_sessions(pb::RevokeUserSessionsRequest {
                    tenant_id: "crash".into(),
                    user_id: user.clone(),
                    except_session_id: String::new(),
                    reason: pb::RevokeReason::Admin as i32,
                })
                .await;
            Op::RevokeAll {
                user,
                result: outcome(r.map(|r| r.into_inner().revoked_session_ids)),
            }
        } else {
            let Some(k) = pick(&mut rng) else { continue };
            let _ = validate(&mut client, &k.token).await;
            continue;
        };
        let unknown = op.is_unknown();
        history.ops.lock().expect("lock").push(op);
        if unknown {
            // Its server is down (a killed replica): wait rather than record a flood of calls.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `WORKERS` workers recording into one history, spread over `channels` (one server's, or each
/// replica's in turn), until the flag is set.
fn start_workers(
    channels: &[Channel],
    seed: u64,
) -> (
    Arc<History>,
    Arc<AtomicBool>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let history = Arc::new(History {
        ops: Mutex::new(Vec::new()),
        known: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let workers = (0..WORKERS)
        .map(|w| {
            tokio::spawn(worker(
                SessionServiceClient::new(channels[w as usize % channels.len()].clone()),
                history.clone(),
                seed.wrapping_mul(31).wrapping_add(w),
                stop.clone(),
            ))
        })
        .collect();
    (history, stop, workers)
}

/// What the history says about one acknowledged session.
#[derive(Debug, Default)]
struct Fate {
    user: String,
    /// Tokens in acknowledged order: the create's, then each acknowledged rotation's.
    tokens: Vec<String>,
    ended_for_sure: bool,
    maybe_ended: bool,
    maybe_rotated: bool,
}

fn fates(ops: &[Op]) -> HashMap<String, Fate> {
    let mut fates: HashMap<String, Fate> = HashMap::new();
    for op in ops {
        if let Op::Create {
            user,
            result: Outcome::Ok((id, token, _)),
        } = op
        {
            let fate = fates.entry(id.clone()).or_default();
            fate.user = user.clone();
            fate.tokens.insert(0, token.clone());
        }
    }
    // Rotations in the order they were recorded per session: acknowledged ones chain.
    for op in ops {
        if let Op::Rotate { id, old, result } = op {
            let Some(fate) = fates.get_mut(id) else {
                continue;
            };
            match result {
                Outcome::Ok(new) if fate.tokens.last() == Some(old) => {
                    fate.tokens.push(new.clone())
                }
                Outcome::Ok(_) | Outcome::Unknown => fate.maybe_rotated = true,
                Outcome::Failed => {}
            }
        }
    }
    let users_with_unknown_creates: HashSet<&String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Create {
                user,
                result: Outcome::Unknown,
            } => Some(user),
            _ => None,
        })
        .collect();
    for op in ops {
        match op {
            Op::Create {
                result: Outcome::Ok((_, _, evicted)),
                ..
            } => {
                for e in evicted {
                    if let Some(f) = fates.get_mut(e) {
                        f.ended_for_sure = true;
                    }
                }
            }
            Op::Revoke { id, result } => {
                if let Some(f) = fates.get_mut(id) {
                    match result {
                        Outcome::Ok(()) => f.ended_for_sure = true,
                        Outcome::Unknown => f.maybe_ended = true,
                        Outcome::Failed => {}
                    }
                }
            }
            Op::RevokeAll { user, result } => match result {
                Outcome::Ok(ids) => {
                    for id in ids {
                        if let Some(f) = fates.get_mut(id) {
                            f.ended_for_sure = true;
                        }
                    }
                    // A revoke-all also ends sessions it did not list because they had ended.
                }
                Outcome::Unknown => {
                    for f in fates.values_mut().filter(|f| f.user == *user) {
                        f.maybe_ended = true;
                    }
                }
                Outcome::Failed => {}
            },
            _ => {}
        }
    }
    for f in fates.values_mut() {
        // A create of unknown outcome may have evicted any session of its user; so may an
        // acknowledged create, which lists what it evicted (handled above). A revoke-all that
        // was acknowledged ended every session of its user created before it; we cannot order
        // that against concurrent creates, so treat it as "maybe".
        if users_with_unknown_creates.contains(&f.user) {
            f.maybe_ended = true;
        }
    }
    let revoke_all_users: HashSet<&String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::RevokeAll {
                user,
                result: Outcome::Ok(_),
            } => Some(user),
            _ => None,
        })
        .collect();
    for f in fates.values_mut() {
        if revoke_all_users.contains(&f.user) {
            f.maybe_ended = true;
        }
    }
    fates
}

/// Every event in the log, read until a heartbeat says the stream has caught up to the head.
async fn whole_log(channel: Channel) -> (Vec<pb::SessionEvent>, u64) {
    let mut stream = EventServiceClient::new(channel)
        .watch_events(pb::WatchEventsRequest {
            announce_live: false,
            log_epoch: None,
            after_sequence: Some(0),
            filter: None,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("log read in time")
            .expect("ok")
            .expect("open");
        match item.message {
            Some(Message::Event(e)) => events.push(e),
            Some(Message::Heartbeat(h)) if h.delivered_through >= h.head_sequence => {
                return (events, h.head_sequence)
            }
            _ => {}
        }
    }
}

async fn round(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let limit = LIMIT.to_string();
    let args = [
        "--max-sessions-per-user",
        limit.as_str(),
        "--heartbeat-interval",
        "50ms",
        // The checker's model: a rotation kills the old token at once, and a stale copy is
        // refused, not taken for theft (reuse detection has its own tests).
        "--rotation-grace-period",
        "0s",
        "--token-reuse-action",
        "ignore",
    ];
    let (mut child, addr) = spawn_binary(&data, &args).await;
    let channel = connect_channel(&addr).await;

    let (history, stop, workers) = start_workers(std::slice::from_ref(&channel), seed);
    let kill_after = Duration::from_millis(150 + rng.next_u64() % 1200);
    tokio::time::sleep(kill_after).await;
    child.start_kill().expect("kill -9");
    child.wait().await.expect("reaped");
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    drop(channel);

    let (_child, addr) = spawn_binary(&data, &args).await;
    let channel = connect_channel(&addr).await;
    check(
        seed,
        channel,
        &history,
        format!("killed after {kill_after:?}"),
    )
    .await;
}

/// The checks after a crash, through a server started since: what was acknowledged is there,
/// what was revoked stays revoked, the log is whole and agrees with the state, limits hold.
async fn check(seed: u64, channel: Channel, history: &History, what: String) {
    let mut client = SessionServiceClient::new(channel.clone());
    let ops = history.ops.lock().expect("lock").clone();
    let fates = fates(&ops);
    let acked_creates = fates.len();
    let unknown = ops.iter().filter(|op| op.is_unknown()).count();

    // Sessions and tokens.
    for (id, fate) in &fates {
        let (latest, older) = fate.tokens.split_last().expect("a create token");
        for token in older {
            assert_not_valid(validate(&mut client, token).await);
        }
        let state = get(&mut client, id).await.map(|s| s.state());
        if fate.ended_for_sure {
            assert_not_valid(validate(&mut client, latest).await);
            assert_ne!(
                state.ok(),
                Some(pb::SessionState::Active),
                "seed {seed}: {id} revoked"
            );
        } else if !fate.maybe_ended {
            assert_eq!(
                state.ok(),
                Some(pb::SessionState::Active),
                "seed {seed}: acknowledged session {id} lost"
            );
            if !fate.maybe_rotated {
                validate(&mut client, latest).await.unwrap_or_else(|e| {
                    panic!("seed {seed}: acknowledged token of {id} lost: {e:?}")
                });
            }
        }
    }

    // The event log: contiguous, complete, agreeing with the state.
    let (events, head) = whole_log(channel.clone()).await;
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    let expected: Vec<u64> = (1..=head).collect();
    assert_eq!(
        sequences, expected,
        "seed {seed}: holes or repeats in the log"
    );
    let mut created = HashSet::new();
    let mut ended = HashSet::new();
    for e in &events {
        match &e.body {
            Some(Body::Created(_)) => {
                created.insert(e.session_id.clone());
            }
            Some(Body::Revoked(_)) | Some(Body::Expired(_)) => {
                assert!(
                    ended.insert(e.session_id.clone()),
                    "seed {seed}: ended twice"
                );
            }
            _ => {}
        }
    }
    for (id, fate) in &fates {
        assert!(
            created.contains(id),
            "seed {seed}: no created event for {id}"
        );
        if fate.ended_for_sure {
            assert!(ended.contains(id), "seed {seed}: no end event for {id}");
        }
    }
    for id in &created {
        let state = get(&mut client, id).await.map(|s| s.state()).ok();
        let live = state == Some(pb::SessionState::Active);
        assert_eq!(
            live,
            !ended.contains(id),
            "seed {seed}: log and state disagree on {id}"
        );
    }
    // Limits hold, and the sequence continues.
    for u in 0..USERS {
        let live = list_all(&mut client, "crash", &format!("u{u}"), 100)
            .await
            .len();
        assert!(live <= LIMIT, "seed {seed}: u{u} has {live} live sessions");
    }
    let next = create(&mut client, "crash", "after").await;
    assert_eq!(
        next.sequence,
        head + 1,
        "seed {seed}: the sequence continues"
    );
    println!(
        "crash round seed={seed}: {what}, {} calls recorded ({acked_creates} acknowledged creates, {unknown} unknown), log head {head}: ok",
        ops.len()
    );
}

/// The same workload over two replicas (the workers split between them) on a 3-member etcd;
/// at a random moment SIGKILL takes one replica, both, an etcd member, or a replica and a
/// member at once; the survivors run on a moment; what died restarts; the same checks run
/// through one replica, and the other serves the same log.
async fn cluster_round(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut etcd = EtcdCluster::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = [dir.path().join("a"), dir.path().join("b")];
    let limit = LIMIT.to_string();
    let endpoints = etcd.endpoints().join(",");
    let args = [
        "--max-sessions-per-user",
        limit.as_str(),
        "--heartbeat-interval",
        "50ms",
        "--rotation-grace-period",
        "0s",
        "--token-reuse-action",
        "ignore",
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoints.as_str(),
        "--etcd-prefix",
        "/crash/",
    ];
    let mut replicas = [
        spawn_binary(&data[0], &args).await,
        spawn_binary(&data[1], &args).await,
    ];
    let channels = [
        connect_channel(&replicas[0].1).await,
        connect_channel(&replicas[1].1).await,
    ];
    let (history, stop, workers) = start_workers(&channels, seed);
    let kill_after = Duration::from_millis(300 + rng.next_u64() % 1500);
    tokio::time::sleep(kill_after).await;
    let choice = rng.next_u32() % 4;
    let member = (rng.next_u32() % 3) as usize;
    let (killed_replicas, kill_member): (&[usize], bool) = match choice {
        0 => (&[0], false),
        1 => (&[], true),
        2 => (&[0, 1], false),
        _ => (&[1], true),
    };
    for &r in killed_replicas {
        replicas[r].0.start_kill().expect("kill -9");
        replicas[r].0.wait().await.expect("reaped");
    }
    if kill_member {
        etcd.kill(member);
    }
    // The survivors carry on without what died.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("worker");
    }
    drop(channels);
    if kill_member {
        etcd.restart(member);
    }
    for &r in killed_replicas {
        replicas[r] = spawn_binary(&data[r], &args).await;
    }
    let what = format!(
        "killed replicas {killed_replicas:?}{} after {kill_after:?}",
        if kill_member {
            format!(" and etcd member {member}")
        } else {
            String::new()
        }
    );
    let a = connect_channel(&replicas[0].1).await;
    let b = connect_channel(&replicas[1].1).await;
    check(seed, a.clone(), &history, what).await;
    let (on_a, head_a) = whole_log(a).await;
    let (on_b, head_b) = whole_log(b).await;
    assert_eq!(head_a, head_b, "seed {seed}: the replicas' logs end alike");
    assert_eq!(on_a, on_b, "seed {seed}: the replicas serve the same log");
}

#[tokio::test]
async fn acknowledged_changes_survive_sigkill_in_every_round() {
    rounds(4, |seed| Box::pin(round(seed))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill_of_replicas_and_etcd_members() {
    rounds(3, |seed| Box::pin(cluster_round(seed))).await;
}

/// Runs `CRASH_ROUNDS` rounds (default `default`) of fresh seeds, or the one `CRASH_SEED`.
async fn rounds(
    default: u64,
    round: impl Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
) {
    if let Ok(seed) = std::env::var("CRASH_SEED") {
        round(seed.parse().expect("CRASH_SEED is a number")).await;
        return;
    }
    let rounds: u64 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    for r in 0..rounds {
        let seed = base.wrapping_mul(1000).wrapping_add(r);
        println!("crash round {r}: seed {seed} (replay with CRASH_SEED={seed})");
        round(seed).await;
    }
}
