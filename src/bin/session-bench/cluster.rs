//! `cluster`: the etcd backend beside the sled single node, in one run with the same callers and
//! connections: validate, create and revoke through one replica and through two (over a local
//! 3-member etcd), what validate's read fence costs (a third replica runs without it), and how
//! long after a revoke's reply on replica A a validate on replica B refuses the session.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use session_authority::{
    proto::v1::{self as pb, session_service_client::SessionServiceClient},
    store::etcd::local::{find_etcd, LocalCluster},
};
use tonic::transport::Channel;

use super::{
    closed_loop, closed_loop_upto, connect, fmt_ms, make_pool, percentile, record, server_args,
    validate_loop, Args, Error, OwnServer, Report,
};

/// The targets the scale-out issue names, as ratios in one run.
const VALIDATE_TARGET: f64 = 0.8;
const CREATE_TARGET: f64 = 0.5;
const REVOKE_TO_REFUSED_P99_MS: f64 = 5.0;

pub async fn run(args: &Args) -> Result<(), Error> {
    let etcd = args.etcd_bin.clone().or_else(find_etcd).ok_or(
        "no etcd binary: pass --etcd-bin, set ETCD_BIN, or `cargo fetch` (etcd-bin-vendored)",
    )?;
    let cluster =
        tokio::task::spawn_blocking(move || LocalCluster::start(&etcd, 3, None)).await??;
    let endpoints = format!("--etcd-endpoints={}", cluster.endpoints().join(","));
    let extra = server_args(args);
    let replica = |fence: bool| {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--store=etcd".into(),
            endpoints.clone(),
            "--etcd-prefix=/bench/".into(),
            format!("--etcd-read-fence={fence}"),
        ]);
        a
    };
    let start = |a: Vec<String>| {
        let bin = args.server_bin.clone();
        async move {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            OwnServer::start(bin, &refs).await
        }
    };
    let sled = OwnServer::start(args.server_bin.clone(), &extra).await?;
    let a = start(replica(true)).await?;
    let b = start(replica(true)).await?;
    let unfenced = start(replica(false)).await?;
    let conns = args.connections.max(1);
    let on_sled = connect(sled.addr, conns).await?;
    let on_a = connect(a.addr, conns).await?;
    let on_b = connect(b.addr, conns).await?;
    let on_unfenced = connect(unfenced.addr, conns).await?;
    // Two replicas: the same number of connections, half to each.
    let mut on_both = connect(a.addr, conns.div_ceil(2)).await?;
    on_both.extend(connect(b.addr, conns / 2).await?);

    let options = session_authority::store::EtcdOptions {
        endpoints: cluster.endpoints(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let size_before = session_authority::store::etcd::db_size(&options).await?;

    // validate
    let pool = Arc::new(make_pool(&on_sled, args.pool).await?);
    let sled_validate = validate_loop(args, &on_sled, pool).await;
    sled_validate.print("cluster.validate.sled", None);
    let pool = Arc::new(make_pool(&on_a, args.pool).await?);
    // etcd's backend grows by every revision until compaction: this is the cost before it.
    let size_after = session_authority::store::etcd::db_size(&options).await?;
    let per_session = size_after.saturating_sub(size_before) as f64 / args.pool.max(1) as f64;
    record("cluster.etcd_bytes_per_session".into(), per_session);
    let quota: f64 = 8.0 * (1u64 << 30) as f64;
    println!(
        "scenario=cluster.etcd_storage sessions={} db_growth_bytes={} bytes_per_session={per_session:.0} sessions_per_8GiB_quota={:.0}",
        args.pool,
        size_after.saturating_sub(size_before),
        quota / per_session.max(1.0)
    );
    let one = validate_loop(args, &on_a, pool.clone()).await;
    one.print("cluster.validate.etcd_1_replica", None);
    let two = validate_loop(args, &on_both, pool.clone()).await;
    two.print("cluster.validate.etcd_2_replicas", None);
    let no_fence = validate_loop(args, &on_unfenced, pool).await;
    no_fence.print("cluster.validate.etcd_1_replica_no_fence", None);

    // create
    let create = |channels: &[Channel], name: &'static str| {
        let channels = channels.to_vec();
        async move {
            let r = closed_loop(args, &channels, move |ch, i| async move {
                SessionServiceClient::new(ch)
                    .create_session(pb::CreateSessionRequest {
                        tenant_id: "bench".into(),
                        user_id: format!("{name}-{i}"),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            })
            .await;
            r.print(&format!("cluster.create.{name}"), None);
            r
        }
    };
    let sled_create = create(&on_sled, "sled").await;
    let one_create = create(&on_a, "etcd_1_replica").await;
    let two_create = create(&on_both, "etcd_2_replicas").await;

    // revoke: each call ends a distinct session of a pool made beforehand
    let revoke = |channels: &[Channel], name: &'static str| {
        let channels = channels.to_vec();
        async move {
            let tokens = make_pool(&channels, args.pool).await?;
            let ids: Arc<Vec<String>> = Arc::new(
                tokens
                    .iter()
                    .filter_map(|t| session_authority::token::parse(t))
                    .map(|p| p.session_id.to_string())
                    .collect(),
            );
            // The run ends when the pool is used up: every call then is a real revoke.
            let calls = ids.len();
            let r = closed_loop_upto(args, &channels, calls, move |ch, i| {
                let ids = ids.clone();
                async move {
                    let Some(id) = ids.get(i).cloned() else {
                        return Err(tonic::Status::internal("past the pool: a bench bug"));
                    };
                    SessionServiceClient::new(ch)
                        .revoke_session(pb::RevokeSessionRequest {
                            session_id: id,
                            reason: pb::RevokeReason::Admin as i32,
                        })
                        .await
                        .map(drop)
                }
            })
            .await;
            r.print(&format!("cluster.revoke.{name}"), None);
            Ok::<Report, Error>(r)
        }
    };
    let sled_revoke = revoke(&on_sled, "sled").await?;
    let one_revoke = revoke(&on_a, "etcd_1_replica").await?;
    let two_revoke = revoke(&on_both, "etcd_2_replicas").await?;

    // revoke on A, then refused on B
    let mut latencies = Vec::new();
    let mut creator = SessionServiceClient::new(on_a[0].clone());
    let mut checker = SessionServiceClient::new(on_b[0].clone());
    for i in 0..args.revokes.max(1) {
        let created = creator
            .create_session(pb::CreateSessionRequest {
                tenant_id: "bench".into(),
                user_id: format!("propagation-{i}"),
                ..Default::default()
            })
            .await?
            .into_inner();
        let id = created.session.map(|s| s.session_id).unwrap_or_default();
        let started = Instant::now();
        creator
            .revoke_session(pb::RevokeSessionRequest {
                session_id: id,
                reason: pb::RevokeReason::Admin as i32,
            })
            .await?;
        loop {
            let answer = checker
                .validate_session(pb::ValidateSessionRequest {
                    token: created.token.clone(),
                    touch: Some(false),
                    device: None,
                })
                .await;
            if answer.is_err() {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("replica B still validates a session revoked on A after 10 s".into());
            }
        }
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    let p50 = percentile(&latencies, 0.5);
    let p99 = percentile(&latencies, 0.99);
    record(
        "cluster.revoke_to_refused.p99_ms".into(),
        p99.as_secs_f64() * 1e3,
    );
    println!(
        "scenario=cluster.revoke_to_refused samples={} p50={} p99={} target_p99<{REVOKE_TO_REFUSED_P99_MS}ms {}",
        latencies.len(),
        fmt_ms(p50),
        fmt_ms(p99),
        verdict(p99.as_secs_f64() * 1e3 < REVOKE_TO_REFUSED_P99_MS)
    );

    let ratio = |x: &Report, y: &Report| x.rate / y.rate.max(1e-9);
    let p99_ms = |r: &Report| percentile(&r.latencies, 0.99).as_secs_f64() * 1e3;
    let figures = [
        (
            "validate_1_replica_to_sled",
            ratio(&one, &sled_validate),
            Some(VALIDATE_TARGET),
        ),
        (
            "validate_2_replicas_to_sled",
            ratio(&two, &sled_validate),
            None,
        ),
        (
            "create_1_replica_to_sled",
            ratio(&one_create, &sled_create),
            Some(CREATE_TARGET),
        ),
        (
            "create_2_replicas_to_sled",
            ratio(&two_create, &sled_create),
            None,
        ),
        (
            "revoke_1_replica_to_sled",
            ratio(&one_revoke, &sled_revoke),
            None,
        ),
        (
            "revoke_2_replicas_to_sled",
            ratio(&two_revoke, &sled_revoke),
            None,
        ),
        ("fence_rate_cost", 1.0 - ratio(&one, &no_fence), None),
    ];
    for (name, value, target) in figures {
        record(format!("cluster.{name}"), value);
        match target {
            Some(t) => println!(
                "compare=cluster.{name} value={value:.2} target>={t} {}",
                verdict(value >= t)
            ),
            None => println!("compare=cluster.{name} value={value:.2}"),
        }
    }
    println!(
        "compare=cluster.fence_p99 with_fence={:.2}ms without={:.2}ms",
        p99_ms(&one),
        p99_ms(&no_fence)
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}
