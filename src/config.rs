//! Every setting, its default and its meaning, in one struct.
//!
//! Precedence, lowest first: built-in defaults, the TOML file named by `--config`, environment
//! variables (`SESSION_AUTHORITY_<SETTING>`), command-line flags. Tests build a [`Config`]
//! directly, so they need neither files nor environment variables.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

use crate::model::policy::{
    DriftAction, LimitAction, NewDeviceAction, Policy, SameSite, TokenReuseAction, TravelAction,
};

/// A secret setting (a password): read like any string, never shown by `Debug`, so a logged or
/// printed `Config` carries no secret.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The service's settings. Durations are written like `30m`, `12h`, `7d`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Directory of the embedded store. Created if missing; never overwritten if foreign.
    pub data_dir: PathBuf,
    /// Where sessions live: `sled` (embedded, one process) or `etcd` (several replicas on one
    /// etcd cluster).
    pub store: StoreKind,
    /// etcd members to use (`store = "etcd"`): `http://host:port` or `https://host:port` URLs,
    /// comma-separated or a list. Calls fail over between them.
    #[serde(deserialize_with = "endpoints")]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this deployment in etcd, so several deployments share a cluster.
    pub etcd_prefix: String,
    /// PEM CA bundle that signed the etcd members' certificates (https endpoints).
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd (client-certificate authentication), with `etcd_key_file`.
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user, when the cluster has authentication on (`etcd_password` with it).
    pub etcd_username: Option<String>,
    /// Sent to etcd over https only (its Authenticate call carries it as it is).
    pub etcd_password: Option<Secret>,
    /// Whether a validate first makes sure this replica has seen every write acknowledged
    /// anywhere before it (a linearizable read shared by the validates in flight). Off, a
    /// revocation made through another replica may validate here for the few milliseconds the
    /// watch takes (longer if this replica is cut off from etcd).
    pub etcd_read_fence: bool,
    /// A session unused this long ends.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A session ends this long after creation, however active.
    #[serde(with = "humantime_serde")]
    pub absolute_timeout: Duration,
    /// Idle timeout of "remember me" sessions.
    #[serde(with = "humantime_serde")]
    pub remember_me_idle_timeout: Duration,
    /// Absolute timeout of "remember me" sessions.
    #[serde(with = "humantime_serde")]
    pub remember_me_absolute_timeout: Duration,
    /// Most live sessions one user may hold (default policy).
    pub max_sessions_per_user: u32,
    /// What happens at the limit (default policy).
    pub limit_action: LimitAction,
    /// Whether "remember me" is allowed (default policy).
    pub remember_me_allowed: bool,
    /// Most sessions a user may create per rolling 24 hours; 0 means no quota (default policy).
    pub max_creations_per_day: u32,
    /// Sessions older than this are revoked even if active; absent means no maximum.
    #[serde(with = "humantime_serde", default)]
    pub max_session_age: Option<Duration>,
    /// What impossible travel triggers (default policy).
    pub travel_action: TravelAction,
    /// Speed above which travel is impossible, km/h (default policy).
    pub travel_max_speed_kmh: f64,
    /// Distance within which two places count as the same, km (default policy).
    pub travel_tolerance_km: f64,
    /// Whether the session cookie is Secure (default policy).
    pub cookie_secure: bool,
    /// The cookie's SameSite attribute (default policy).
    pub cookie_same_site: SameSite,
    /// What a replaced token presented after the grace period triggers (default policy).
    pub token_reuse_action: TokenReuseAction,
    /// How long a token replaced by rotation still validates (default policy).
    #[serde(with = "humantime_serde")]
    pub rotation_grace_period: Duration,
    /// What a login from a new device or place triggers (default policy).
    pub new_device_action: NewDeviceAction,
    /// What a session presented from another browser, OS or country triggers (default policy).
    pub drift_action: DriftAction,
    /// How long a token of a device-bound session lives before a signed refresh (default policy).
    #[serde(with = "humantime_serde")]
    pub bound_token_ttl: Duration,
    /// Resolution of `last_seen_at`: a validate writes the new last use only when the stored one
    /// is at least this old, so validation is not a disk write per call. Idle deadlines are
    /// therefore exact to within this interval.
    #[serde(with = "humantime_serde")]
    pub touch_interval: Duration,
    /// How often the sweeper ends sessions past their deadline and prunes the event log.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Events older than this are pruned from the log.
    #[serde(with = "humantime_serde")]
    pub event_retention_age: Duration,
    /// At most this many events are kept in the log.
    pub event_retention_count: u64,
    /// How long a revoked or expired session stays visible (GetSession) before it is purged.
    #[serde(with = "humantime_serde")]
    pub tombstone_retention: Duration,
    /// A user's last known place (for impossible travel) is forgotten when it is this old; the
    /// next login is then not compared with it. It is also the window of new-device signals: a
    /// login is compared with the user's logins of this long before it, and they are kept as
    /// long (at most 32 per user). Login-quota records go once they hold no creation of the last
    /// day. All are purged by the sweeper, so churning users never grow the disk.
    #[serde(with = "humantime_serde")]
    pub user_state_retention: Duration,
    /// At most this many users' last places and login histories are kept (each a record; the
    /// least recently written go first, a sweeper's pass after the count is passed): on etcd
    /// every replica holds them in memory.
    pub user_state_retention_count: u64,
    /// Audit records older than this are purged by the sweeper.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
    /// At most this many audit records are kept (the oldest go first): on etcd every replica
    /// holds the trail in memory.
    pub audit_retention_count: u64,
    /// An idle event stream receives a heartbeat this often.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Capacity of the in-memory live event fan-out; a subscriber further behind reads from the
    /// durable log instead.
    pub event_buffer: usize,
    /// Memory for sled's page cache, in MiB: what the store's writes need in memory.
    pub cache_mib: u64,
    /// Memory for the live sessions kept in front of the store (validate's hot path), in MiB.
    /// Bound by bytes, not entries: a browser session costs about 330 bytes, one with the largest
    /// allowed attributes and user agent about 8 KiB. Size it to hold every live session (README,
    /// "Sizing the embedded store"). 0 turns the cache off.
    pub session_cache_mib: u64,
    /// Log format: `text` for people, `json` for log pipelines.
    pub log_format: LogFormat,
    /// Where to serve Prometheus metrics over plain HTTP (`/metrics`); off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the gRPC health service alone, in plaintext and without credentials (for
    /// probes that cannot speak TLS, like the kubelet's); off when absent.
    pub health_listen: Option<SocketAddr>,

    // --- security ---
    /// PEM certificate chain for TLS. With `tls_key`, the server speaks only TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: when set, every client must present a certificate signed by it (mTLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Allows plaintext, or no authentication, on a non-loopback address. Never the default.
    pub insecure: bool,
    /// API keys, by their SHA-256 (never the key itself).
    pub api_keys: Vec<ApiKeyConfig>,
    /// Roles of client certificates (mTLS), by subject common name or subject alternative name.
    pub client_identities: Vec<ClientIdentityConfig>,
    /// Whether server reflection is open to every caller (otherwise admins only).
    pub reflection_open: bool,
    /// Unary calls in flight at once; beyond it calls are refused at once with
    /// RESOURCE_EXHAUSTED rather than queued.
    pub max_in_flight: usize,
    /// A call that has not answered by then fails with DEADLINE_EXCEEDED (streams: until the
    /// stream starts).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Event streams one caller may hold open at once.
    pub max_subscribers_per_caller: usize,
    /// Failed validations allowed per client IP (as given in the request's `device.ip`; IPv6
    /// per /64) per minute, after a burst of as many; beyond it that IP's invalid tokens get
    /// RESOURCE_EXHAUSTED. Its valid tokens are always answered.
    pub failed_validations_per_ip_per_minute: u32,
    /// Failed validations per caller per minute, after a burst of as many, beyond which the
    /// caller is reported (a metric and a warn line), never refused.
    pub failed_validations_per_caller_per_minute: u32,
}

/// A caller's role: what it may call (see `security::methods`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including policies, bulk revocation, stats, audit and reflection.
    Admin,
    /// The data plane of a backend: create, validate, rotate, read and revoke sessions, watch.
    Service,
    /// Watch events and validate only.
    Subscriber,
}

/// An API key, configured by the hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who this is, for logs and the audit trail.
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    pub role: Role,
    /// If set, the caller can only see and touch this tenant's sessions and policy.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// A client certificate identity: matches a certificate whose subject CN equals `identity`
/// (written `CN=name`) or one of whose subject alternative names (DNS, URI, email) equals it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientIdentityConfig {
    pub identity: String,
    pub role: Role,
    #[serde(default)]
    pub tenant: Option<String>,
}

/// The store backend.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sled,
    Etcd,
}

/// `etcd_endpoints` as a comma-separated string (flags, environment) or a list (TOML).
fn endpoints<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }
    let list = match Form::deserialize(d)? {
        Form::One(s) => s.split(',').map(str::to_string).collect(),
        Form::Many(v) => v,
    };
    Ok(list
        .into_iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect())
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("./data"),
            store: StoreKind::Sled,
            etcd_endpoints: Vec::new(),
            etcd_prefix: "/session-authority/".into(),
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            etcd_username: None,
            etcd_password: None,
            etcd_read_fence: true,
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            remember_me_idle_timeout: Duration::from_secs(7 * 86400),
            remember_me_absolute_timeout: Duration::from_secs(30 * 86400),
            max_sessions_per_user: 10,
            limit_action: LimitAction::EvictLeastRecentlyUsed,
            remember_me_allowed: true,
            max_creations_per_day: 0,
            max_session_age: None,
            travel_action: TravelAction::Flag,
            travel_max_speed_kmh: 1000.0,
            travel_tolerance_km: 100.0,
            cookie_secure: true,
            cookie_same_site: SameSite::Lax,
            token_reuse_action: TokenReuseAction::Revoke,
            rotation_grace_period: crate::model::policy::DEFAULT_ROTATION_GRACE_PERIOD,
            new_device_action: NewDeviceAction::Flag,
            drift_action: DriftAction::None,
            bound_token_ttl: crate::model::policy::DEFAULT_BOUND_TOKEN_TTL,
            touch_interval: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(10),
            event_retention_age: Duration::from_secs(7 * 86400),
            event_retention_count: 10_000_000,
            tombstone_retention: Duration::from_secs(86_400),
            user_state_retention: Duration::from_secs(30 * 86_400),
            audit_retention: Duration::from_secs(365 * 86_400),
            audit_retention_count: 1_000_000,
            user_state_retention_count: 2_000_000,
            heartbeat_interval: Duration::from_secs(15),
            event_buffer: 4096,
            cache_mib: 192,
            session_cache_mib: 384,
            log_format: LogFormat::Text,
            metrics_listen: None,
            health_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            insecure: false,
            api_keys: Vec::new(),
            client_identities: Vec::new(),
            reflection_open: false,
            max_in_flight: 2048,
            request_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1024,
            max_subscribers_per_caller: 2048,
            failed_validations_per_ip_per_minute: 60,
            failed_validations_per_caller_per_minute: 6000,
        }
    }
}

/// A setting is out of its allowed range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Invalid(&'static str, String),
    #[error("reading configuration: {0}")]
    Load(#[from] Box<figment::Error>),
}

impl Config {
    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, name: &'static str, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(name, why.to_string()))
            }
        };
        let second = Duration::from_secs(1);
        check(
            self.idle_timeout >= second,
            "idle_timeout",
            "must be at least 1s",
        )?;
        check(
            self.absolute_timeout >= self.idle_timeout,
            "absolute_timeout",
            "must be at least idle_timeout",
        )?;
        check(
            self.remember_me_idle_timeout >= second,
            "remember_me_idle_timeout",
            "must be at least 1s",
        )?;
        check(
            self.remember_me_absolute_timeout >= self.remember_me_idle_timeout,
            "remember_me_absolute_timeout",
            "must be at least remember_me_idle_timeout",
        )?;
        check(
            (1..=10_000).contains(&self.max_sessions_per_user),
            "max_sessions_per_user",
            "must be 1-10000",
        )?;
        check(
            self.touch_interval < self.idle_timeout,
            "touch_interval",
            "must be shorter than idle_timeout",
        )?;
        check(
            self.sweep_interval >= Duration::from_millis(10),
            "sweep_interval",
            "must be at least 10ms",
        )?;
        check(
            self.tombstone_retention <= Duration::from_secs(365 * 86_400),
            "tombstone_retention",
            "must be at most 365d",
        )?;
        check(
            self.user_state_retention >= Duration::from_secs(86_400),
            "user_state_retention",
            "must be at least 1d",
        )?;
        check(
            self.audit_retention >= Duration::from_secs(86_400),
            "audit_retention",
            "must be at least 1d",
        )?;
        check(
            self.event_retention_count >= 1,
            "event_retention_count",
            "must be at least 1",
        )?;
        check(
            self.audit_retention_count >= 1,
            "audit_retention_count",
            "must be at least 1",
        )?;
        check(
            self.user_state_retention_count >= 1,
            "user_state_retention_count",
            "must be at least 1",
        )?;
        check(
            self.heartbeat_interval >= Duration::from_millis(10),
            "heartbeat_interval",
            "must be at least 10ms",
        )?;
        check(
            (16..=1 << 20).contains(&self.event_buffer),
            "event_buffer",
            "must be 16-1048576",
        )?;
        check(self.cache_mib >= 8, "cache_mib", "must be at least 8")?;
        if self.store == StoreKind::Etcd {
            check(
                !self.etcd_endpoints.is_empty(),
                "etcd_endpoints",
                "name at least one etcd member (store = etcd)",
            )?;
            for e in &self.etcd_endpoints {
                check(
                    e.starts_with("http://") || e.starts_with("https://"),
                    "etcd_endpoints",
                    "each must be an http:// or https:// URL",
                )?;
            }
            crate::store::etcd::check_prefix(&self.etcd_prefix)
                .map_err(|why| ConfigError::Invalid("etcd_prefix", why))?;
            check(
                self.etcd_cert_file.is_some() == self.etcd_key_file.is_some(),
                "etcd_cert_file",
                "etcd_cert_file and etcd_key_file go together",
            )?;
            check(
                self.etcd_username.is_some() == self.etcd_password.is_some(),
                "etcd_username",
                "etcd_username and etcd_password go together",
            )?;
        }
        check(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "tls_cert",
            "tls_cert and tls_key go together",
        )?;
        check(
            self.tls_client_ca.is_none() || self.tls_cert.is_some(),
            "tls_client_ca",
            "mutual TLS needs tls_cert and tls_key",
        )?;
        check(
            self.client_identities.is_empty() || self.tls_client_ca.is_some(),
            "client_identities",
            "need tls_client_ca, or no client presents a certificate",
        )?;
        let mut hashes = std::collections::HashSet::new();
        for key in &self.api_keys {
            let ok = key.sha256.len() == 64 && key.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            check(
                ok,
                "api_keys",
                "sha256 must be 64 hex characters (the key's SHA-256, never the key)",
            )?;
            // One key, two entries: which role and tenant it gets would depend on their order.
            if !hashes.insert(key.sha256.to_ascii_lowercase()) {
                return Err(ConfigError::Invalid(
                    "api_keys",
                    format!(
                        "\"{}\" has the same sha256 as an earlier key: one key must map to one caller",
                        key.name
                    ),
                ));
            }
        }
        check(
            self.max_in_flight >= 1,
            "max_in_flight",
            "must be at least 1",
        )?;
        check(
            self.request_timeout >= Duration::from_millis(100),
            "request_timeout",
            "must be at least 100ms",
        )?;
        check(
            self.max_concurrent_streams >= 1,
            "max_concurrent_streams",
            "must be at least 1",
        )?;
        check(
            self.max_subscribers_per_caller >= 1,
            "max_subscribers_per_caller",
            "must be at least 1",
        )?;
        check(
            self.failed_validations_per_ip_per_minute >= 1
                && self.failed_validations_per_caller_per_minute >= 1,
            "failed_validations_per_ip_per_minute",
            "failure budgets must be at least 1",
        )?;
        self.check_exposure(self.listen)?;
        // The default policy obeys the same bounds as a tenant's.
        Policy::from(self).validate().map_err(|e| match e {
            crate::error::Error::InvalidArgument { field, reason } => {
                ConfigError::Invalid(field.trim_start_matches("policy."), reason)
            }
            other => ConfigError::Invalid("policy", other.to_string()),
        })?;
        Ok(())
    }

    /// Plaintext or anonymous access is only for this machine, unless explicitly `insecure`.
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), ConfigError> {
        if addr.ip().is_loopback() || self.insecure {
            return Ok(());
        }
        if self.tls_cert.is_none() {
            return Err(ConfigError::Invalid(
                "listen",
                format!("{addr} is not loopback: it needs TLS (tls_cert, tls_key) or --insecure"),
            ));
        }
        if !self.auth_enabled() {
            return Err(ConfigError::Invalid(
                "listen",
                format!("{addr} is not loopback: callers must authenticate (api_keys or client_identities) or --insecure"),
            ));
        }
        Ok(())
    }

    /// Whether callers must authenticate: as soon as any credential is configured.
    pub fn auth_enabled(&self) -> bool {
        !self.api_keys.is_empty() || !self.client_identities.is_empty()
    }

    /// Reads the configuration from defaults, the optional file, the environment and `args`.
    pub fn load<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::load_with_tool(args).map(|(config, _)| config)
    }

    /// As [`Config::load`], and the operator tool asked for, if any.
    pub fn load_with_tool<I, T>(args: I) -> Result<(Self, Option<Tool>), ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::parse_from(args);
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &cli.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("SESSION_AUTHORITY_").filter(|key| key != "config"))
            .merge(Serialized::defaults(&cli.settings))
            .extract()
            .map_err(Box::new)?;
        if let Some(tool) = cli.tool {
            // Tools take their own arguments; of the settings, `restore --to-etcd` reads the
            // etcd ones.
            return Ok((config, Some(tool)));
        }
        config.validate()?;
        Ok((config, None))
    }
}

/// Command line of the `session-authority` binary: serve (no subcommand), or an operator tool.
#[derive(Debug, Parser)]
#[command(name = "session-authority", version, about)]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    /// A TOML file with any of the settings below (same names, snake_case).
    #[arg(long, short, env = "SESSION_AUTHORITY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: CliSettings,
}

/// Operator tools built into the binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Tool {
    /// Fetch a consistent backup from a running server into a file (needs an unbound admin; the
    /// API key is read from SESSION_AUTHORITY_API_KEY).
    Backup {
        /// The server, e.g. http://127.0.0.1:50051 or https://sessions.example.com:50051.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// PEM CA to trust for an https server.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Restore a backup file into a data directory (offline: no server may run on it), or, with
    /// `--store etcd` before the command, into an empty `etcd_prefix` of an etcd cluster.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create (sled).
        #[arg(long, required_unless_present = "to_etcd")]
        into: Option<PathBuf>,
        /// Restore into etcd (`etcd_endpoints`, `etcd_prefix`) instead of a directory.
        #[arg(long)]
        to_etcd: bool,
        /// If the directory is not empty, move it to <dir>.before-restore first.
        #[arg(long)]
        force: bool,
    },
}

/// Flags that override the environment and the file. Absent flags leave those (or the default)
/// alone. Every setting can also be set as `SESSION_AUTHORITY_<SETTING>` in the environment.
#[derive(Debug, clap::Args, Serialize)]
struct CliSettings {
    /// Address to serve gRPC on [default: 127.0.0.1:50051]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// Directory of the embedded store [default: ./data]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Idle timeout, e.g. 30m [default: 30m]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout: Option<String>,
    /// Absolute timeout [default: 12h]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    absolute_timeout: Option<String>,
    /// Idle timeout of "remember me" sessions [default: 7d]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    remember_me_idle_timeout: Option<String>,
    /// Absolute timeout of "remember me" sessions [default: 30d]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    remember_me_absolute_timeout: Option<String>,
    /// Most live sessions per user [default: 10]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_sessions_per_user: Option<u32>,
    /// Resolution of last-seen times [default: 60s]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    touch_interval: Option<String>,
    /// How often expired sessions are swept [default: 10s]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    sweep_interval: Option<String>,
    /// Oldest event kept in the log [default: 7d]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    event_retention_age: Option<String>,
    /// Most events kept in the log [default: 10000000]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    event_retention_count: Option<u64>,
    /// How long ended sessions stay visible [default: 24h]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tombstone_retention: Option<String>,
    /// How long a user's last known place is kept [default: 30d]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    user_state_retention: Option<String>,
    /// Most last places and login histories kept [default: 2000000]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    user_state_retention_count: Option<u64>,
    /// How long audit records are kept [default: 365d]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_retention: Option<String>,
    /// Most audit records kept [default: 1000000]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_retention_count: Option<u64>,
    /// Heartbeat period of idle event streams [default: 15s]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_interval: Option<String>,
    /// Live event fan-out capacity [default: 4096]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    event_buffer: Option<usize>,
    /// Store backend: sled (embedded) or etcd (several replicas) [default: sled]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<StoreKind>,
    /// etcd endpoints, comma-separated http(s)://host:port URLs
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_endpoints: Option<String>,
    /// Key prefix of this deployment in etcd [default: /session-authority/]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_prefix: Option<String>,
    /// PEM CA bundle of the etcd members' certificates
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_cert_file: Option<PathBuf>,
    /// PEM client key for etcd
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_key_file: Option<PathBuf>,
    /// etcd user (the password from SESSION_AUTHORITY_ETCD_PASSWORD or the file)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_username: Option<String>,
    /// Validate waits until this replica has seen every write acknowledged before it [default: true]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_read_fence: Option<bool>,
    /// sled's page cache in MiB, for the store's writes [default: 192]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_mib: Option<u64>,
    /// Live sessions kept in memory for validate, in MiB (about 330 per million) [default: 384]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    session_cache_mib: Option<u64>,
    /// What happens at the session limit [default: evict-least-recently-used]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_action: Option<LimitAction>,
    /// Whether "remember me" is allowed [default: true]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    remember_me_allowed: Option<bool>,
    /// Sessions a user may create per rolling 24 h, 0 for no quota [default: 0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_creations_per_day: Option<u32>,
    /// Maximum session age, revoked even if active [default: none]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_session_age: Option<String>,
    /// What impossible travel triggers [default: flag]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    travel_action: Option<TravelAction>,
    /// Impossible-travel speed, km/h [default: 1000]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    travel_max_speed_kmh: Option<f64>,
    /// Same-place tolerance, km [default: 100]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    travel_tolerance_km: Option<f64>,
    /// Secure attribute of the session cookie [default: true]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cookie_secure: Option<bool>,
    /// SameSite attribute of the session cookie [default: lax]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cookie_same_site: Option<SameSite>,
    /// What a replaced token presented after the grace period triggers [default: revoke]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    token_reuse_action: Option<TokenReuseAction>,
    /// How long a replaced token still validates [default: 10s]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rotation_grace_period: Option<String>,
    /// What a login from a new device or place triggers [default: flag]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    new_device_action: Option<NewDeviceAction>,
    /// What a session presented from another browser, OS or country triggers [default: none]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    drift_action: Option<DriftAction>,
    /// Lifetime of a device-bound session's token [default: 10m]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_token_ttl: Option<String>,
    /// PEM certificate chain; enables TLS with --tls-key
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle; requires client certificates signed by it (mTLS)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_client_ca: Option<PathBuf>,
    /// Allow plaintext or unauthenticated access on a non-loopback address
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    insecure: Option<bool>,
    /// Calls in flight before shedding with RESOURCE_EXHAUSTED [default: 2048]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<usize>,
    /// Deadline of a call [default: 10s]
    #[arg(long, value_parser = duration)]
    #[serde(skip_serializing_if = "Option::is_none")]
    request_timeout: Option<String>,
    /// HTTP/2 streams per connection [default: 1024]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_concurrent_streams: Option<u32>,
    /// Event streams one caller may hold [default: 2048]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_subscribers_per_caller: Option<usize>,
    /// Failed validations per client IP per minute [default: 60]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_validations_per_ip_per_minute: Option<u32>,
    /// Failed validations per caller per minute [default: 6000]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_validations_per_caller_per_minute: Option<u32>,
    /// Open server reflection to every caller [default: false]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    reflection_open: Option<bool>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9090 [default: off]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<SocketAddr>,
    /// Serve only gRPC health, plaintext, on this address (for probes) [default: off]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    health_listen: Option<SocketAddr>,
    /// Log format [default: text]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
}

/// Checks a duration flag early (so a typo fails with clap's message) and keeps its text for the
/// merge.
fn duration(s: &str) -> Result<String, humantime::DurationError> {
    humantime::parse_duration(s).map(|_| s.to_string())
}

/// The default policy: the one a tenant without its own follows.
impl From<&Config> for Policy {
    fn from(c: &Config) -> Self {
        Self {
            idle_timeout: c.idle_timeout,
            absolute_timeout: c.absolute_timeout,
            remember_me_allowed: c.remember_me_allowed,
            remember_me_idle_timeout: c.remember_me_idle_timeout,
            remember_me_absolute_timeout: c.remember_me_absolute_timeout,
            max_sessions_per_user: c.max_sessions_per_user,
            limit_action: c.limit_action,
            max_creations_per_day: c.max_creations_per_day,
            max_session_age: c.max_session_age,
            travel_action: c.travel_action,
            travel_max_speed_kmh: c.travel_max_speed_kmh,
            travel_tolerance_km: c.travel_tolerance_km,
            cookie_name: None,
            cookie_secure: c.cookie_secure,
            cookie_same_site: c.cookie_same_site,
            token_reuse_action: c.token_reuse_action,
            rotation_grace_period: c.rotation_grace_period,
            new_device_action: c.new_device_action,
            drift_action: c.drift_action,
            bound_token_ttl: c.bound_token_ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_arguments_gives_the_documented_defaults() {
        let config = Config::load(["session-authority"]).expect("defaults load");
        assert_eq!(config, Config::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sa.toml");
        std::fs::write(
            &file,
            "idle_timeout = \"5m\"\nmax_sessions_per_user = 3\nlisten = \"127.0.0.1:7000\"\n",
        )
        .expect("write");
        let config = Config::load([
            "session-authority",
            "--config",
            file.to_str().expect("utf-8 path"),
            "--max-sessions-per-user",
            "4",
        ])
        .expect("loads");
        assert_eq!(config.idle_timeout, Duration::from_secs(300));
        assert_eq!(config.max_sessions_per_user, 4);
        assert_eq!(config.listen.port(), 7000);
    }

    /// A `Config` reaches logs (`{:?}`): the etcd password read from a file never shows.
    #[test]
    fn a_loaded_etcd_password_is_read_but_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sa.toml");
        std::fs::write(
            &file,
            "etcd_username = \"sa\"\netcd_password = \"hunter2\"\n",
        )
        .expect("write");
        let config = Config::load([
            "session-authority",
            "--config",
            file.to_str().expect("utf-8 path"),
        ])
        .expect("loads");
        assert_eq!(
            config.etcd_password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("etcd_password"), "{shown}");
    }

    #[test]
    fn out_of_range_settings_are_refused_by_name() {
        let err = Config::load(["session-authority", "--max-sessions-per-user", "0"])
            .expect_err("zero refused");
        assert!(err.to_string().contains("max_sessions_per_user"), "{err}");
        let err = Config::load([
            "session-authority",
            "--idle-timeout",
            "2h",
            "--absolute-timeout",
            "1h",
        ])
        .expect_err("absolute < idle refused");
        assert!(err.to_string().contains("absolute_timeout"), "{err}");
    }

    #[test]
    fn two_api_keys_with_the_same_hash_are_refused() {
        let key = |name: &str, sha256: &str| ApiKeyConfig {
            name: name.into(),
            sha256: sha256.into(),
            role: Role::Service,
            tenant: None,
        };
        let hash = "ab".repeat(32);
        let config = Config {
            api_keys: vec![key("web", &hash), key("admin", &hash.to_ascii_uppercase())],
            ..Config::default()
        };
        let err = config.validate().expect_err("duplicate refused");
        assert!(err.to_string().contains("api_keys"), "{err}");
        assert!(err.to_string().contains("admin"), "{err}");
        let config = Config {
            api_keys: vec![key("web", &hash), key("admin", &"cd".repeat(32))],
            ..Config::default()
        };
        config.validate().expect("distinct keys");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sa.toml");
        std::fs::write(&file, "idle_timout = \"5m\"\n").expect("write");
        let err = Config::load(["session-authority", "-c", file.to_str().expect("utf-8")])
            .expect_err("typo refused");
        assert!(err.to_string().contains("idle_timout"), "{err}");
    }
}
