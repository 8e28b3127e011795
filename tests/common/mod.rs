//! A real server on a loopback port with a temporary data directory and a manual clock, started by
//! the same `run` that `main` uses.

#![allow(dead_code)]

use std::{net::SocketAddr, path::Path, process::Stdio, sync::Arc, time::Duration};

use session_authority::{
    clock::{ManualClock, Timestamp},
    config::{ApiKeyConfig, Config, Role},
    proto::v1::{self as pb, session_service_client::SessionServiceClient},
};
use tempfile::TempDir;
use tokio::{
    net::TcpListener,
    process::{Child, Command},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::{transport::Channel, Code, Status};

/// 2026-01-01T00:00:00Z: tests start the clock here so timestamps are readable.
pub const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);

pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    pub dir: Arc<TempDir>,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<session_authority::error::Result<()>>>,
}

/// Settings for tests: short, round numbers so clock arithmetic is easy to read.
pub fn test_config() -> Config {
    Config {
        idle_timeout: Duration::from_secs(600),
        absolute_timeout: Duration::from_secs(3600),
        remember_me_idle_timeout: Duration::from_secs(86_400),
        remember_me_absolute_timeout: Duration::from_secs(30 * 86_400),
        max_sessions_per_user: 5,
        touch_interval: Duration::from_secs(10),
        // The sweeper runs on real time; it reads the manual clock.
        sweep_interval: Duration::from_millis(20),
        cache_mib: 16,
        ..Config::default()
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let clock = Arc::new(ManualClock::new(START));
        Self::start_in(dir, clock, config).await
    }

    /// Starts on an existing directory and clock, e.g. to test a restart.
    pub async fn start_in(dir: Arc<TempDir>, clock: Arc<ManualClock>, config: Config) -> Self {
        // 127.0.0.2 (still loopback), away from child servers and etcd members on 127.0.0.1.
        Self::start_at("127.0.0.2:0".parse().expect("addr"), dir, clock, config).await
    }

    /// As `start_in`, listening on `addr`.
    pub async fn start_at(
        addr: SocketAddr,
        dir: Arc<TempDir>,
        clock: Arc<ManualClock>,
        mut config: Config,
    ) -> Self {
        config.data_dir = dir.path().join("data");
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel();
        let served = session_authority::run(listener, config.clone(), clock.clone(), async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            let result = served.await;
            if let Err(e) = &result {
                // A server that fails to start shows up as a refused connection; say why.
                eprintln!("test server on {addr} stopped with an error: {e}");
            }
            result
        });
        Self {
            addr,
            clock,
            dir,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.channel().await)
    }

    /// Stops gracefully and waits until the data directory is closed.
    pub async fn stop(mut self) -> (Arc<TempDir>, Arc<ManualClock>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stopped cleanly");
        }
        (self.dir.clone(), self.clock.clone())
    }

    /// Stops and starts again on the same directory and clock.
    pub async fn restart(self) -> Self {
        let config = self.config.clone();
        let (dir, clock) = self.stop().await;
        Self::start_in(dir, clock, config).await
    }

    /// Stops and starts again on the same directory, clock and port, as a redeploy looks to
    /// clients that keep their connection settings.
    pub async fn restart_on_same_port(self) -> Self {
        let (addr, config) = (self.addr, self.config.clone());
        let (dir, clock) = self.stop().await;
        Self::start_at(addr, dir, clock, config).await
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

pub fn create_request(tenant: &str, user: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        tenant_id: tenant.into(),
        user_id: user.into(),
        ..Default::default()
    }
}

pub async fn create(
    client: &mut SessionServiceClient<Channel>,
    tenant: &str,
    user: &str,
) -> pb::CreateSessionResponse {
    client
        .create_session(create_request(tenant, user))
        .await
        .expect("create")
        .into_inner()
}

pub async fn validate(
    client: &mut SessionServiceClient<Channel>,
    token: &str,
) -> Result<pb::Session, Status> {
    validate_with(client, token, None).await
}

pub async fn validate_with(
    client: &mut SessionServiceClient<Channel>,
    token: &str,
    touch: Option<bool>,
) -> Result<pb::Session, Status> {
    client
        .validate_session(pb::ValidateSessionRequest {
            token: token.into(),
            touch,
            device: None,
        })
        .await
        .map(|r| r.into_inner().session.expect("session in reply"))
}

/// Asserts the one answer every bad token gets.
pub fn assert_not_valid(result: Result<pb::Session, Status>) {
    let status = result.expect_err("token must not validate");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "session not valid");
}

pub async fn get(
    client: &mut SessionServiceClient<Channel>,
    id: &str,
) -> Result<pb::Session, Status> {
    client
        .get_session(pb::GetSessionRequest {
            session_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().session.expect("session in reply"))
}

/// Every live session of a tenant (or user), following pages of `page_size`.
pub async fn list_all(
    client: &mut SessionServiceClient<Channel>,
    tenant: &str,
    user: &str,
    page_size: u32,
) -> Vec<pb::Session> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sessions(pb::ListSessionsRequest {
                tenant_id: tenant.into(),
                user_id: user.into(),
                page_size,
                page_token,
                filter: None,
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.sessions.len() <= page_size as usize);
        out.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}

/// Polls `check` until it is true, for at most 5 s of real time (for background work such as the
/// sweeper, which runs on its own schedule).
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, Duration::from_secs(5), check).await
}

/// As `eventually`, waiting up to `limit`.
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

// === the real binary as a child process ===

/// The server binary on `dir` with extra `args`, and its address once it serves. It binds port 0
/// and says where in its "serving" log line: a port picked here and released could be taken by
/// another test before the child bound it, and its client would then talk to that other server.
/// The child's output goes to this test's stderr, shown when the test fails.
pub async fn spawn_binary(dir: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_session-authority"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir)
        .args(args)
        // The "serving" line is logged at info, whatever the developer's RUST_LOG.
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn server");
    let (serving, address) = oneshot::channel();
    tokio::spawn(forward(child.stderr.take().expect("piped"), None));
    tokio::spawn(forward(child.stdout.take().expect("piped"), Some(serving)));
    match tokio::time::timeout(Duration::from_secs(60), address).await {
        Ok(Ok(addr)) => (child, addr),
        Ok(Err(_)) => panic!("the server exited before serving (its output is above)"),
        Err(_) => panic!("the server did not serve within 60 s (its output is above)"),
    }
}

/// Copies a child server's output to stderr, and sends the address of its "serving" line.
async fn forward(
    out: impl tokio::io::AsyncRead + Unpin,
    mut serving: Option<oneshot::Sender<String>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[server] {line}");
        if let Some(addr) = serving.as_ref().and_then(|_| serving_addr(&line)) {
            if let Some(tx) = serving.take() {
                let _ = tx.send(addr);
            }
        }
    }
}

/// The address in a JSON "serving" log line.
fn serving_addr(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    (fields.get("message")?.as_str()? == "serving")
        .then(|| fields.get("addr")?.as_str().map(str::to_owned))
        .flatten()
}

/// Connects to `addr`, waiting up to 20 s for the server to come up.
pub async fn connect_channel(addr: &str) -> Channel {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
        {
            Ok(channel) => return channel,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("server never came up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub async fn connect(addr: &str) -> SessionServiceClient<Channel> {
    SessionServiceClient::new(connect_channel(addr).await)
}

/// An API key entry for `secret`, configured (as the server wants it) by its SHA-256.
pub fn api_key(name: &str, secret: &str, role: Role, tenant: Option<&str>) -> ApiKeyConfig {
    use sha2::Digest;
    ApiKeyConfig {
        name: name.into(),
        sha256: hex::encode(sha2::Sha256::digest(secret.as_bytes())),
        role,
        tenant: tenant.map(String::from),
    }
}

/// A loopback address with a port that was free a moment ago, for a listener that cannot report
/// the port it bound (metrics, health). On 127.0.0.3, where nothing else here listens (servers,
/// child servers and etcd members are on 127.0.0.1 and 127.0.0.2), so none of them can take the
/// port before its listener binds it.
pub fn free_loopback_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.3:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

// === API keys on the client side ===

/// Adds `authorization: Bearer <secret>` to every request.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub fn bearer(secret: &str) -> Bearer {
    Bearer(format!("Bearer {secret}").parse().expect("ascii"))
}

pub type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// A SessionService client presenting the API key `secret`.
pub async fn sessions_as(server: &TestServer, secret: &str) -> SessionServiceClient<Authed> {
    SessionServiceClient::with_interceptor(server.channel().await, bearer(secret))
}

// === the event stream ===

/// A WatchEvents stream with no filter: from the head (`after` = `None`) or after a sequence,
/// announcing with a heartbeat when it is live if asked.
pub async fn watch_from<T>(
    mut events: session_authority::proto::v1::event_service_client::EventServiceClient<T>,
    after: Option<u64>,
    announce_live: bool,
) -> tonic::Streaming<pb::WatchEventsResponse>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    events
        .watch_events(pb::WatchEventsRequest {
            after_sequence: after,
            filter: None,
            announce_live,
            log_epoch: None,
        })
        .await
        .expect("watch")
        .into_inner()
}
