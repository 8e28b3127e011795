//! `scale`: one server grows through each of `--sessions` (created through the API, durably, as
//! users would); at each size, validate throughput and latency over tokens spread across every
//! session loaded, the server's RSS and disk use, and the time a crashed server (SIGKILL) takes
//! to answer again. With `--scale-store etcd` the server is a replica over a local 3-member etcd:
//! "disk" is etcd's backend, a restart reloads the replica's copy from etcd, and the RSS after it
//! is what a replica costs to hold that many sessions.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use session_authority::{
    proto::v1::{self as pb, session_service_client::SessionServiceClient},
    store::{
        etcd::{
            self,
            local::{find_etcd, LocalCluster},
        },
        EtcdOptions,
    },
};
use tonic::transport::Channel;

use crate::{connect, fmt_ms, percentile, validate_loop, Args, Error, OwnServer, ScaleStore};

/// Tokens kept to validate: enough to spread over the whole store and to exceed the server's
/// in-memory session cache (131,072 entries), so that at scale most validations read sled; few
/// enough to hold.
const SAMPLE: usize = 1_000_000;
/// Concurrent creators while loading.
const LOADERS: usize = 256;

pub async fn run(args: &Args) -> Result<(), Error> {
    let mut sizes = args.sessions.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let largest = sizes.last().copied().ok_or("--sessions is empty")?;
    let stride = (largest / SAMPLE).max(1);
    let mut server_args: Vec<String> = crate::server_args(args)
        .iter()
        .map(|a| a.to_string())
        .collect();
    let cluster = match args.scale_store {
        ScaleStore::Sled => None,
        ScaleStore::Etcd => {
            let etcd = args.etcd_bin.clone().or_else(find_etcd).ok_or(
                "no etcd binary: pass --etcd-bin, set ETCD_BIN, or `cargo fetch` (etcd-bin-vendored)",
            )?;
            // etcd's largest recommended quota, so the load never meets NOSPACE.
            let cluster =
                tokio::task::spawn_blocking(move || LocalCluster::start(&etcd, 3, Some(8 << 30)))
                    .await??;
            server_args.extend([
                "--store=etcd".to_string(),
                format!("--etcd-endpoints={}", cluster.endpoints().join(",")),
                "--etcd-prefix=/scale/".to_string(),
            ]);
            Some(cluster)
        }
    };
    let options = cluster.as_ref().map(|c| EtcdOptions {
        endpoints: c.endpoints(),
        ..EtcdOptions::default()
    });
    let refs: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let mut server = OwnServer::start(args.server_bin.clone(), &refs).await?;
    let mut channels = connect(server.addr, args.connections.max(1)).await?;
    let sample = Arc::new(Mutex::new(Vec::new()));
    let mut loaded = 0;
    let mut baseline_p99 = None;
    for n in sizes {
        let started = Instant::now();
        load(&channels, loaded, n, stride, &sample).await?;
        let load_rate = (n - loaded) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        eprintln!("scale: loaded {n} sessions ({load_rate:.0} creates/s)");
        loaded = n;
        let tokens = Arc::new(
            sample
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        );
        let validate = validate_loop(args, &channels, tokens.clone()).await;
        let rss = server.rss_mib();
        // On etcd the store is the cluster's backend (one member's), not the server's directory.
        let disk = match &options {
            Some(options) => etcd::db_size(options).await? as f64 / (1024.0 * 1024.0),
            None => server.disk_mib(),
        };
        let restart = server.crash_and_restart().await?;
        channels = connect(server.addr, args.connections.max(1)).await?;
        // Still there after the crash.
        SessionServiceClient::new(channels[0].clone())
            .validate_session(pb::ValidateSessionRequest {
                token: tokens[tokens.len() - 1].clone(),
                touch: Some(false),
                device: None,
            })
            .await?;
        // Memory of a server that loaded the store as it started, rather than grew with it.
        let rss_restarted = server.rss_mib();
        let p99 = percentile(&validate.latencies, 0.99);
        let base = *baseline_p99.get_or_insert(p99);
        println!(
            "scenario=scale store={:?} sessions={n} validate_per_sec={:.0} p50={} p99={} p999={} errors={} p99_vs_smallest={:.2} server_rss_mib={rss:.0} rss_after_restart_mib={rss_restarted:.0} disk_mib={disk:.0} restart_secs={:.2} load_creates_per_sec={:.0}",
            args.scale_store,
            validate.rate,
            fmt_ms(percentile(&validate.latencies, 0.50)),
            fmt_ms(p99),
            fmt_ms(percentile(&validate.latencies, 0.999)),
            validate.errors,
            p99.as_secs_f64() / base.as_secs_f64().max(1e-9),
            restart.as_secs_f64(),
            load_rate,
        );
    }
    Ok(())
}

/// Creates sessions `from..to` with `LOADERS` concurrent callers (one user each, so no per-user
/// limit applies), keeping every `stride`-th token.
async fn load(
    channels: &[Channel],
    from: usize,
    to: usize,
    stride: usize,
    sample: &Arc<Mutex<Vec<String>>>,
) -> Result<(), Error> {
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for t in 0..LOADERS {
        let mut client = SessionServiceClient::new(channels[t % channels.len()].clone());
        let (next, sample) = (next.clone(), sample.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return Ok::<_, tonic::Status>(());
                }
                let r = create_retrying(&mut client, i).await?;
                if i % stride == 0 {
                    sample
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(r.token);
                }
                if i % 1_000_000 == 0 && i > 0 {
                    eprintln!("scale: {i} sessions");
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Creates one session, waiting out load shedding (RESOURCE_EXHAUSTED) rather than failing.
async fn create_retrying(
    client: &mut SessionServiceClient<Channel>,
    i: usize,
) -> Result<pb::CreateSessionResponse, tonic::Status> {
    loop {
        let r = client
            .create_session(pb::CreateSessionRequest {
                tenant_id: "scale".into(),
                user_id: format!("user-{i}"),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(s) => return Err(s),
        }
    }
}
