//! `session-bench`: a closed-loop load generator for session-authority.
//!
//! It drives a running server (`--addr`), or starts the release server binary itself on a
//! temporary data directory, and prints one line per scenario: calls per second, latency
//! percentiles, errors, and the ratio to `health` from the same run (absolute figures drift on a
//! shared machine; ratios travel better).
//!
//! ```text
//! cargo build --release
//! target/release/session-bench health validate create --callers 64 --connections 4 --seconds 10
//! target/release/session-bench fanout --subscribers 1,100,1000 --revokes 200
//! target/release/session-bench cache --seconds 5
//! target/release/session-bench overload
//! target/release/session-bench replay --log-events 200000 --replays 8
//! target/release/session-bench cluster --seconds 5
//! target/release/session-bench soak --minutes 30
//! ```
//!
//! Loopback only: it refuses any address that is not on this machine.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

mod bound;
mod cache;
mod cluster;
mod redis;
mod replay;
mod scale;

use clap::{Parser, ValueEnum};
use session_authority::proto::v1::{
    self as pb, event_service_client::EventServiceClient, session_event::Body,
    session_service_client::SessionServiceClient, watch_events_response::Message,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

#[derive(Parser, Debug)]
#[command(
    name = "session-bench",
    about = "Load generator for session-authority (loopback only)"
)]
struct Args {
    /// Scenarios to run, in order.
    #[arg(value_enum, required = true)]
    scenarios: Vec<Scenario>,
    /// A running server; without it the bench starts its own on a temporary directory.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Concurrent callers in the closed loop.
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds each closed-loop scenario runs.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Live sessions validated by the `validate` scenario.
    #[arg(long, default_value_t = 10_000)]
    pool: usize,
    /// Subscriber counts for `fanout`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    subscribers: Vec<usize>,
    /// Revokes measured per subscriber count in `fanout`.
    #[arg(long, default_value_t = 200)]
    revokes: usize,
    /// Extra arguments for the server the bench starts (repeat for each), e.g. --server-arg=--cache-mib=128.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// The server binary to start when no --addr is given.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Length of the `soak` scenario.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Sessions created per second in `soak`.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Repeat the closed-loop scenarios this many times and finish with their medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Tokens per ValidateSessions call in `batch`.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Also run `validate` and `create` against Redis and print the service/Redis ratio. Starts
    /// redis-server (from apt) on a loopback port unless --redis-addr is given.
    #[arg(long)]
    redis: bool,
    /// Connections to Redis (default: --connections). Each multiplexes (pipelines) its callers'
    /// commands; set it to --callers for a connection per caller, as with a connection pool.
    #[arg(long)]
    redis_connections: Option<usize>,
    /// A running Redis to compare against (loopback only).
    #[arg(long)]
    redis_addr: Option<SocketAddr>,
    /// Events in the log that `replay` replays (grown by creating sessions).
    #[arg(long, default_value_t = 200_000)]
    log_events: usize,
    /// Subscribers replaying the log at once in `replay`.
    #[arg(long, default_value_t = 8)]
    replays: usize,
    /// The etcd binary for `cluster` (default: $ETCD_BIN, `etcd` on the PATH, or the one the
    /// etcd-bin-vendored crate put in cargo's registry).
    #[arg(long)]
    etcd_bin: Option<PathBuf>,
    /// The store `scale` runs on: `sled`, or `etcd` (a local 3-member cluster, found like
    /// `cluster`'s, with the bench's server as its one replica).
    #[arg(long, value_enum, default_value = "sled")]
    scale_store: ScaleStore,
    /// Session counts for `scale`, comma-separated: the first is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "10000,10000000")]
    sessions: Vec<usize>,
    /// `scale`'s users get ids spread over the whole key space (as random UUIDs are), rather than
    /// `user-0`, `user-1`... in the order they log in, whose per-user keys land side by side.
    /// `create`'s too, each a browser login as in `scale` (without it: no device).
    #[arg(long)]
    random_users: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ScaleStore {
    Sled,
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// grpc.health.v1.Health/Check: the transport's ceiling.
    Health,
    /// ValidateSession (touch on) over a pool of live sessions.
    Validate,
    /// Durable CreateSession.
    Create,
    /// 90% validate, 8% create, 2% revoke (of sessions this scenario created).
    Mixed,
    /// ValidateSessions with --batch-size tokens per call.
    Batch,
    /// Revoke latency to N event subscribers.
    Fanout,
    /// The Rust client's CachedValidator: hits per second on one core, revoke-to-eviction.
    Cache,
    /// Normal load, then ten times as many callers, then normal again: shedding and recovery.
    Overload,
    /// Sessions created and expiring for a long time: RSS and disk must stay flat.
    Soak,
    /// Validate p99, RSS, disk and restart time at each of --sessions (preloaded offline).
    Scale,
    /// The etcd backend beside sled in one run: validate, create and revoke through 1 and 2
    /// replicas over a local 3-member etcd, the read fence's cost, revoke-on-A to refused-on-B.
    Cluster,
    /// Validate p99 alone, then while --replays subscribers replay a --log-events log through a
    /// filter that matches nothing.
    Replay,
    /// Hijacking defences: validate over device-bound vs unbound sessions and over sessions with
    /// a full replaced-token list vs never rotated ones; DBSC refreshes per second.
    Bound,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    // These start servers of their own, with the settings they need.
    if args.scenarios.contains(&Scenario::Soak) {
        return soak(&args).await;
    }
    if args.scenarios.contains(&Scenario::Overload) {
        return overload(&args).await;
    }
    if args.scenarios.contains(&Scenario::Scale) {
        return scale::run(&args).await;
    }
    if args.scenarios.contains(&Scenario::Cluster) {
        return cluster::run(&args).await;
    }
    let redis = match (args.redis, args.redis_addr) {
        (_, Some(addr)) if !addr.ip().is_loopback() => {
            return Err(format!("{addr} is not a loopback address").into())
        }
        (_, Some(addr)) => Some((addr, None)),
        (true, None) => {
            let own = redis::OwnRedis::start().await?;
            Some((own.addr, Some(own)))
        }
        (false, None) => None,
    };
    let (addr, _server) = match args.addr {
        Some(addr) if !addr.ip().is_loopback() => {
            return Err(
                format!("{addr} is not a loopback address; load stays on this machine").into(),
            )
        }
        Some(addr) => (addr, None),
        None => {
            let server = OwnServer::start(args.server_bin.clone(), &server_args(&args)).await?;
            (server.addr, Some(server))
        }
    };
    let channels = connect(addr, args.connections.max(1)).await?;
    for run in 1..=args.runs.max(1) {
        if args.runs > 1 {
            println!("run={run}");
        }
        run_once(&args, addr, &channels, &redis).await?;
    }
    if args.runs > 1 {
        print_medians();
    }
    Ok(())
}

/// Every scenario of `args` once, in order.
async fn run_once(
    args: &Args,
    addr: SocketAddr,
    channels: &[Channel],
    redis: &Option<(SocketAddr, Option<redis::OwnRedis>)>,
) -> Result<(), Error> {
    let mut health_rate = None;
    for scenario in &args.scenarios {
        match scenario {
            Scenario::Health => {
                let r = health_loop(args, channels).await;
                health_rate = Some(r.rate);
                r.print("health", health_rate);
            }
            Scenario::Validate => {
                let tokens = Arc::new(make_pool(channels, args.pool).await?);
                let r = validate_loop(args, channels, tokens.clone()).await;
                r.print("validate", health_rate);
                if let Some((redis_addr, _)) = &redis {
                    let conns = redis::connections(*redis_addr, redis_conns(args)).await?;
                    let mut first = conns[0].clone();
                    let keys = Arc::new(redis::preload(&mut first, args.pool).await?);
                    let rr = closed_loop(args, &conns, move |mut c, i| {
                        let keys = keys.clone();
                        async move { redis::validate(&mut c, &keys[i % keys.len()]).await }
                    })
                    .await;
                    rr.print("redis-validate", health_rate);
                    print_vs("validate", &r, &rr);
                }
            }
            Scenario::Create => {
                let random_users = args.random_users;
                // Users new to the store, also when an earlier run wrote to it.
                let prefix = format!("create-{}", std::process::id());
                let r = closed_loop(args, channels, move |ch, i| {
                    let request = if random_users {
                        scale::request(&scale::user_id(&prefix, i, true), i)
                    } else {
                        pb::CreateSessionRequest {
                            tenant_id: "bench".into(),
                            user_id: format!("create-{i}"),
                            ..Default::default()
                        }
                    };
                    async move {
                        SessionServiceClient::new(ch)
                            .create_session(request)
                            .await
                            .map(drop)
                    }
                })
                .await;
                r.print("create", health_rate);
                if let Some((redis_addr, _)) = &redis {
                    let conns = redis::connections(*redis_addr, redis_conns(args)).await?;
                    let rr = closed_loop(args, &conns, |mut c, i| async move {
                        redis::create(&mut c, i).await
                    })
                    .await;
                    rr.print("redis-create", health_rate);
                    print_vs("create", &r, &rr);
                }
            }
            Scenario::Mixed => {
                let tokens = Arc::new(make_pool(channels, args.pool).await?);
                let created = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
                let r = closed_loop(args, channels, move |ch, i| {
                    let (tokens, created) = (tokens.clone(), created.clone());
                    async move { mixed_call(ch, i, &tokens, &created).await }
                })
                .await;
                r.print("mixed", health_rate);
            }
            Scenario::Batch => {
                let tokens = Arc::new(make_pool(channels, args.pool).await?);
                let size = args.batch_size.clamp(1, 500);
                let r = closed_loop(args, channels, move |ch, i| {
                    let tokens = tokens.clone();
                    async move {
                        let batch = (0..size)
                            .map(|k| tokens[(i * size + k) % tokens.len()].clone())
                            .collect();
                        let results = SessionServiceClient::new(ch)
                            .validate_sessions(pb::ValidateSessionsRequest {
                                tokens: batch,
                                touch: None,
                            })
                            .await?
                            .into_inner()
                            .results;
                        if results.iter().any(|r| r.session.is_none()) {
                            return Err(tonic::Status::internal("a pool token did not validate"));
                        }
                        Ok(())
                    }
                })
                .await;
                r.print(&format!("batch{size}"), health_rate);
                let validations = r.rate * size as f64;
                record(format!("batch{size}.validations_per_sec"), validations);
                println!("scenario=batch{size} validations_per_sec={validations:.0}");
            }
            Scenario::Fanout => {
                for &n in &args.subscribers {
                    fanout(addr, &channels[0], n, args.revokes).await?;
                }
            }
            Scenario::Cache => {
                cache::run(addr, channels, args.pool, args.seconds, args.revokes).await?;
            }
            Scenario::Replay => replay::run(args, channels).await?,
            Scenario::Bound => bound::run(args, channels, health_rate).await?,
            Scenario::Overload | Scenario::Soak | Scenario::Scale | Scenario::Cluster => {}
        }
    }
    Ok(())
}

// === closed loop ===

struct Report {
    rate: f64,
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
    callers: usize,
    connections: usize,
}

/// Every figure printed, by name, for the medians of `--runs`.
static RESULTS: std::sync::Mutex<Vec<(String, f64)>> = std::sync::Mutex::new(Vec::new());

fn record(name: String, value: f64) {
    RESULTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((name, value));
}

/// One line per figure: the median over the runs, and the runs' values.
fn print_medians() {
    let results = RESULTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut names: Vec<&String> = Vec::new();
    for (name, _) in results.iter() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    for name in names {
        let mut values: Vec<f64> = results
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .collect();
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        let all: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
        println!("median {name}={median:.3} runs=[{}]", all.join(","));
    }
}

impl Report {
    fn print(&self, name: &str, health_rate: Option<f64>) {
        let ratio = match health_rate {
            Some(h) if h > 0.0 => format!("{:.2}", self.rate / h),
            _ => "n/a".into(),
        };
        record(format!("{name}.calls_per_sec"), self.rate);
        record(
            format!("{name}.p99_ms"),
            percentile(&self.latencies, 0.99).as_secs_f64() * 1000.0,
        );
        if let Some(h) = health_rate.filter(|h| *h > 0.0) {
            record(format!("{name}.ratio_to_health"), self.rate / h);
        }
        println!(
            "scenario={name} callers={} connections={} seconds={:.1} calls_per_sec={:.0} p50={} p99={} p999={} errors={} ratio_to_health={ratio}",
            self.callers,
            self.connections,
            self.elapsed.as_secs_f64(),
            self.rate,
            fmt_ms(percentile(&self.latencies, 0.50)),
            fmt_ms(percentile(&self.latencies, 0.99)),
            fmt_ms(percentile(&self.latencies, 0.999)),
            self.errors,
        );
    }
}

fn server_args(args: &Args) -> Vec<&str> {
    args.server_arg.iter().map(String::as_str).collect()
}

fn redis_conns(args: &Args) -> usize {
    args.redis_connections.unwrap_or(args.connections).max(1)
}

/// The service's rate over Redis's for the same operation, callers and connections.
fn print_vs(what: &str, service: &Report, redis: &Report) {
    let ratio = if redis.rate > 0.0 {
        record(
            format!("{what}.service_to_redis"),
            service.rate / redis.rate,
        );
        format!("{:.2}", service.rate / redis.rate)
    } else {
        "n/a".into()
    };
    println!(
        "compare={what} callers={} redis_connections={} service_per_sec={:.0} redis_per_sec={:.0} service_to_redis={ratio}",
        service.callers, redis.connections, service.rate, redis.rate
    );
}

/// One call of the mixed load: by the counter, 90% validate a pool token, 8% create, 2% revoke
/// one of the sessions this load created (a validate while there is none yet).
async fn mixed_call(
    ch: Channel,
    i: usize,
    tokens: &[String],
    created: &std::sync::Mutex<Vec<String>>,
) -> Result<(), tonic::Status> {
    let mut client = SessionServiceClient::new(ch);
    let victim = || {
        created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    };
    // A multiplicative hash of the counter spreads the kinds evenly over callers and time.
    let roll = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100;
    match roll {
        90..=97 => {
            let r = client
                .create_session(pb::CreateSessionRequest {
                    tenant_id: "bench".into(),
                    user_id: format!("mixed-{i}"),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if let Some(s) = r.session {
                created
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(s.session_id);
            }
            Ok(())
        }
        98..=99 => match victim() {
            Some(session_id) => client
                .revoke_session(pb::RevokeSessionRequest {
                    session_id,
                    reason: pb::RevokeReason::Admin as i32,
                })
                .await
                .map(drop),
            None => validate_one(&mut client, &tokens[i % tokens.len()], None).await,
        },
        _ => validate_one(&mut client, &tokens[i % tokens.len()], None).await,
    }
}

/// The empty call (`grpc.health.v1.Health/Check`) from every caller of `args`: the transport's
/// ceiling.
async fn health_loop(args: &Args, channels: &[Channel]) -> Report {
    closed_loop(args, channels, |ch, _| async move {
        HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .map(drop)
    })
    .await
}

/// ValidateSession over `tokens` (touch on) from every caller of `args`.
async fn validate_loop(args: &Args, channels: &[Channel], tokens: Arc<Vec<String>>) -> Report {
    validate_loop_touching(args, channels, tokens, 0, None).await
}

/// As `validate_loop`, from the token at `offset` on, with `touch` as the requests' (None: the
/// server's default, a touch).
async fn validate_loop_touching(
    args: &Args,
    channels: &[Channel],
    tokens: Arc<Vec<String>>,
    offset: usize,
    touch: Option<bool>,
) -> Report {
    closed_loop(args, channels, move |ch, i| {
        let token = tokens[(offset + i) % tokens.len()].clone();
        async move { validate_one(&mut SessionServiceClient::new(ch), &token, touch).await }
    })
    .await
}

async fn validate_one(
    client: &mut SessionServiceClient<Channel>,
    token: &str,
    touch: Option<bool>,
) -> Result<(), tonic::Status> {
    client
        .validate_session(pb::ValidateSessionRequest {
            token: token.to_owned(),
            touch,
            device: None,
        })
        .await
        .map(drop)
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1000.0)
}

/// `sorted` must be sorted.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `call` from `args.callers` tasks for `args.seconds`; each task waits for its reply before
/// the next call. The second argument is a per-call counter (distinct per task).
async fn closed_loop<C, F, Fut, E>(args: &Args, channels: &[C], call: F) -> Report
where
    C: Clone + Send + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: Send + 'static,
{
    closed_loop_upto(args, channels, usize::MAX, call).await
}

/// `closed_loop`, stopping early once `calls` calls were made (numbered `0..calls`): for calls
/// that use up what they act on (a pool of sessions to revoke), so that running out is the end
/// of the run, not a stream of failed calls. The rate is over the time the calls took.
async fn closed_loop_upto<C, F, Fut, E>(
    args: &Args,
    channels: &[C],
    calls: usize,
    call: F,
) -> Report
where
    C: Clone + Send + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: Send + 'static,
{
    let duration = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    // Caller c makes calls c, c + callers, c + 2 * callers, ...: every counter is distinct, and
    // a pool indexed by `i % len` is walked evenly rather than one entry per caller.
    let step = args.callers;
    for caller in 0..args.callers {
        let channel = channels[caller % channels.len()].clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut i = caller;
            while Instant::now() < deadline && i < calls {
                let t = Instant::now();
                match call(channel.clone(), i).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                i += step;
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Report {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies,
        errors,
        elapsed,
        callers: args.callers,
        connections: channels.len(),
    }
}

async fn make_pool(channels: &[Channel], n: usize) -> Result<Vec<String>, Error> {
    let mut tasks = Vec::new();
    let per_task = n.div_ceil(64);
    for t in 0..64 {
        let mut client = SessionServiceClient::new(channels[t % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            for i in 0..per_task {
                let r = client
                    .create_session(pb::CreateSessionRequest {
                        tenant_id: "bench".into(),
                        user_id: format!("pool-{t}-{i}"),
                        ..Default::default()
                    })
                    .await?;
                tokens.push(r.into_inner().token);
            }
            Ok::<_, tonic::Status>(tokens)
        }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.extend(t.await??);
    }
    tokens.truncate(n);
    Ok(tokens)
}

// === fan-out ===

/// Opens `n` subscribers, then revokes sessions one at a time and measures, for each revoke, the
/// time from its reply (and from its request) to its event's arrival at every subscriber.
async fn fanout(
    addr: SocketAddr,
    channel: &Channel,
    n: usize,
    revokes: usize,
) -> Result<(), Error> {
    // 100 streams per connection, as a sidecar fleet would spread them.
    let connections = connect(addr, n.div_ceil(100)).await?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut readers = Vec::new();
    for i in 0..n {
        let mut client = EventServiceClient::new(connections[i % connections.len()].clone());
        let mut stream = client
            .watch_events(pb::WatchEventsRequest {
                after_sequence: None,
                filter: Some(pb::EventFilter {
                    tenant_id: "fanout".into(),
                    event_types: vec![pb::EventType::Revoked as i32],
                    ..Default::default()
                }),
                announce_live: false,
                log_epoch: None,
            })
            .await?
            .into_inner();
        let seen = seen_tx.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(item)) = stream.message().await {
                if let Some(Message::Event(e)) = item.message {
                    if matches!(e.body, Some(Body::Revoked(_))) {
                        let _ = seen.send((e.sequence, Instant::now()));
                    }
                }
            }
        }));
    }
    let mut sessions = SessionServiceClient::new(channel.clone());
    let mut from_reply = Vec::with_capacity(n * revokes);
    let mut from_request = Vec::with_capacity(n * revokes);
    let mut before_reply = 0usize;
    for i in 0..revokes {
        let created = sessions
            .create_session(pb::CreateSessionRequest {
                tenant_id: "fanout".into(),
                user_id: format!("u{i}"),
                ..Default::default()
            })
            .await?
            .into_inner();
        let session_id = created.session.map(|s| s.session_id).unwrap_or_default();
        let sent = Instant::now();
        let reply = sessions
            .revoke_session(pb::RevokeSessionRequest {
                session_id,
                reason: pb::RevokeReason::Admin as i32,
            })
            .await?
            .into_inner();
        let replied = Instant::now();
        let mut delivered = 0;
        while delivered < n {
            let (seq, at) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                .await
                .map_err(|_| "a subscriber did not receive a revoke within 30 s")?
                .ok_or("subscribers ended")?;
            if seq != reply.sequence {
                continue;
            }
            delivered += 1;
            from_request.push(at.saturating_duration_since(sent));
            if at < replied {
                before_reply += 1;
            }
            from_reply.push(at.saturating_duration_since(replied));
        }
    }
    for r in readers {
        r.abort();
    }
    from_reply.sort_unstable();
    from_request.sort_unstable();
    println!(
        "scenario=fanout subscribers={n} revokes={revokes} deliveries={} reply_to_delivery_p50={} p99={} max={} request_to_delivery_p50={} p99={} max={} delivered_before_reply={:.1}%",
        from_reply.len(),
        fmt_ms(percentile(&from_reply, 0.50)),
        fmt_ms(percentile(&from_reply, 0.99)),
        fmt_ms(from_reply.last().copied().unwrap_or_default()),
        fmt_ms(percentile(&from_request, 0.50)),
        fmt_ms(percentile(&from_request, 0.99)),
        fmt_ms(from_request.last().copied().unwrap_or_default()),
        100.0 * before_reply as f64 / from_reply.len().max(1) as f64,
    );
    Ok(())
}

// === plumbing ===

async fn connect(addr: SocketAddr, n: usize) -> Result<Vec<Channel>, Error> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

/// The server binary as a child process on a temporary data directory; killed on drop.
struct OwnServer {
    addr: SocketAddr,
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
    extra: Vec<String>,
}

impl OwnServer {
    async fn start(bin: Option<PathBuf>, extra: &[&str]) -> Result<Self, Error> {
        let bin = match bin {
            Some(bin) => bin,
            None => std::env::current_exe()?
                .parent()
                .ok_or("no parent directory")?
                .join("session-authority"),
        };
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let child = Self::spawn(&bin, addr, dir.path(), &extra).await?;
        Ok(Self {
            addr,
            child,
            dir,
            bin,
            extra,
        })
    }

    /// Starts the binary and waits until it answers health checks.
    async fn spawn(
        bin: &std::path::Path,
        addr: SocketAddr,
        dir: &std::path::Path,
        extra: &[String],
    ) -> Result<tokio::process::Child, Error> {
        let child = tokio::process::Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--max-sessions-per-user")
            .arg("10000")
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await
            {
                if HealthClient::new(ch)
                    .check(HealthCheckRequest::default())
                    .await
                    .is_ok()
                {
                    return Ok(child);
                }
            }
            if Instant::now() > deadline {
                return Err("server did not become healthy within 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the server (SIGKILL, as a crash) and starts it again on the same directory and
    /// port; the time until it answered a health check again.
    async fn crash_and_restart(&mut self) -> Result<Duration, Error> {
        self.child.kill().await?;
        let started = Instant::now();
        self.child = Self::spawn(&self.bin, self.addr, self.dir.path(), &self.extra).await?;
        Ok(started.elapsed())
    }

    /// Resident memory of the server process, in MiB.
    fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// The most resident memory the server process has had since it started, in MiB: what a
    /// memory limit must allow.
    fn peak_rss_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    fn status_mib(&self, field: &str) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// Bytes on disk under the data directory, in MiB.
    fn disk_mib(&self) -> f64 {
        fn size(path: &std::path::Path) -> u64 {
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => std::fs::read_dir(path)
                    .map(|entries| entries.flatten().map(|e| size(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        size(self.dir.path()) as f64 / (1024.0 * 1024.0)
    }
}

// === overload ===

/// Validates from `callers` closed-loop callers for `seconds`: (admitted report, shed count, shed
/// p99).
async fn validate_load(
    channels: &[Channel],
    tokens: &Arc<Vec<String>>,
    callers: usize,
    seconds: f64,
) -> (Report, u64, Duration) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let mut client = SessionServiceClient::new(channels[c % channels.len()].clone());
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut shed, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .validate_session(pb::ValidateSessionRequest {
                        token: tokens[i % tokens.len()].clone(),
                        touch: None,
                        device: None,
                    })
                    .await;
                match r {
                    Ok(_) => ok.push(t.elapsed()),
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => shed.push(t.elapsed()),
                    Err(s) => errors.push(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message().chars().take(60).collect::<String>()
                    )),
                }
                i += 7919;
            }
            (ok, shed, errors)
        }));
    }
    let (mut ok, mut shed) = (Vec::new(), Vec::new());
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for t in tasks {
        if let Ok((o, s, e)) = t.await {
            ok.extend(o);
            shed.extend(s);
            for code in e {
                *errors.entry(code).or_default() += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    ok.sort_unstable();
    shed.sort_unstable();
    let report = Report {
        rate: ok.len() as f64 / elapsed.as_secs_f64(),
        latencies: ok,
        errors: errors.values().sum(),
        elapsed,
        callers,
        connections: channels.len(),
    };
    if !errors.is_empty() {
        println!("  other errors by code: {errors:?}");
    }
    (report, shed.len() as u64, percentile(&shed, 0.99))
}

/// Normal load, ten times the callers, normal again. The server sheds beyond `--callers` calls in
/// flight (its sustainable concurrency here), so the overload is answered at once instead of
/// queued.
async fn overload(args: &Args) -> Result<(), Error> {
    let limit = args.callers.to_string();
    let server = OwnServer::start(args.server_bin.clone(), &["--max-in-flight", &limit]).await?;
    let channels = connect(server.addr, args.connections.max(1)).await?;
    let tokens = Arc::new(make_pool(&channels, args.pool.min(2000)).await?);
    let phase = args.seconds.max(2.0);
    for (name, callers) in [
        ("normal", args.callers),
        ("overload_10x", args.callers * 10),
        ("recovered", args.callers),
    ] {
        let (report, shed, shed_p99) = validate_load(&channels, &tokens, callers, phase).await;
        println!(
            "scenario=overload phase={name} callers={callers} admitted_per_sec={:.0} p50={} p99={} shed={shed} shed_p99={} errors={} server_rss_mib={:.0}",
            report.rate,
            fmt_ms(percentile(&report.latencies, 0.50)),
            fmt_ms(percentile(&report.latencies, 0.99)),
            fmt_ms(shed_p99),
            report.errors,
            server.rss_mib(),
        );
    }
    Ok(())
}

// === soak ===

/// Creates sessions at `--rate` per second for `--minutes`, each validated once, against a server
/// whose sessions expire after a minute idle and whose tombstones and events are kept for minutes,
/// so the store reaches a steady state. Prints RSS and disk use as it goes, then whether they
/// stayed flat over the second half.
async fn soak(args: &Args) -> Result<(), Error> {
    let server = OwnServer::start(
        args.server_bin.clone(),
        &[
            "--idle-timeout",
            "1m",
            "--absolute-timeout",
            "2m",
            "--touch-interval",
            "10s",
            "--tombstone-retention",
            "1m",
            "--event-retention-age",
            "2m",
            "--sweep-interval",
            "1s",
        ],
    )
    .await?;
    let channels = connect(server.addr, 4).await?;
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let sample_every = (total / 20).max(Duration::from_secs(5));
    let start = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let created = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let per_worker = (f64::from(args.rate) / 16.0).max(0.1);
    let mut workers = Vec::new();
    for w in 0..16usize {
        let mut client = SessionServiceClient::new(channels[w % channels.len()].clone());
        let (stop, created) = (stop.clone(), created.clone());
        workers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_worker));
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let r = client
                    .create_session(pb::CreateSessionRequest {
                        tenant_id: "soak".into(),
                        user_id: format!("w{w}-{}", i % 1000),
                        ..Default::default()
                    })
                    .await;
                if let Ok(r) = r {
                    let token = r.into_inner().token;
                    let _ = client
                        .validate_session(pb::ValidateSessionRequest {
                            token,
                            touch: None,
                            device: None,
                        })
                        .await;
                    created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let mut samples = Vec::new();
    while start.elapsed() < total {
        tokio::time::sleep(sample_every).await;
        let (rss, disk) = (server.rss_mib(), server.disk_mib());
        let n = created.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "soak t={:.0}s created={n} server_rss_mib={rss:.1} disk_mib={disk:.1}",
            start.elapsed().as_secs_f64()
        );
        samples.push((rss, disk));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    // Steady state comes once sessions, tombstones and events start ageing out (~4 minutes);
    // compare the middle of the run with its end.
    let mid = samples.len() / 2;
    let (rss_mid, disk_mid) = samples.get(mid).copied().unwrap_or_default();
    let (rss_end, disk_end) = samples.last().copied().unwrap_or_default();
    let flat = |a: f64, b: f64| b <= a * 1.25 + 8.0;
    println!(
        "scenario=soak minutes={:.1} rate={} created={} rss_mib mid={rss_mid:.1} end={rss_end:.1} disk_mib mid={disk_mid:.1} end={disk_end:.1} rss_flat={} disk_flat={}",
        args.minutes,
        args.rate,
        created.load(std::sync::atomic::Ordering::Relaxed),
        flat(rss_mid, rss_end),
        flat(disk_mid, disk_end),
    );
    Ok(())
}
