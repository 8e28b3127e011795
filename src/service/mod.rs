//! The tonic layer and the one function that starts the server, used by `main` and the tests.
//!
//! Handlers only decode (see [`convert`]), call the domain, and encode; errors become `Status`
//! through the single mapping in `crate::error`.

mod audit;
mod backup;
pub mod convert;
mod events;
mod policies;
mod sessions;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{server::TcpIncoming, Server};
use tonic_health::{server::HealthReporter, ServingStatus};

pub use self::{
    audit::AuditApi, backup::BackupApi, events::EventApi, policies::PolicyApi, sessions::SessionApi,
};
use crate::{
    clock::Clock,
    config::{Config, StoreKind},
    error::{Error, Result},
    model::policy::Policy,
    proto::{
        self,
        v1::{
            audit_service_server::{self, AuditServiceServer},
            backup_service_server::{self, BackupServiceServer},
            event_service_server::{self, EventServiceServer},
            policy_service_server::{self, PolicyServiceServer},
            session_service_server::{self, SessionServiceServer},
        },
    },
    security::{self, layer::GuardLayer, throttle::FailureThrottle, Authenticator},
    sessions::policies::Policies,
    sessions::subscription::WatchSettings,
    sessions::{run_sweeper, Retention, Sessions},
    store::{EtcdOptions, EtcdStore, SessionStore, SledStore},
    token::TokenGenerator,
};

/// Requests here are tiny; a large one is a mistake or an attack. Replies can be larger (a page
/// of 1000 sessions).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// Applies the message size limits to a generated service (each generated server has the same
/// two setters, but no common trait).
macro_rules! limit {
    ($service:expr) => {
        $service
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_REPLY_BYTES)
    };
}

/// Serves the session authority on `listener` until `shutdown` completes, then stops gracefully:
/// health turns NOT_SERVING, in-flight calls finish, the sweeper stops and the store is flushed
/// and closed. Returns once the data directory can be reopened.
pub async fn run(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config
        .validate()
        .map_err(|e| Error::Server(format!("invalid configuration: {e}")))?;
    match config.store {
        StoreKind::Sled => {
            let store = SledStore::open(
                &config.data_dir,
                config.cache_mib.saturating_mul(1 << 20),
                config.session_cache_mib.saturating_mul(1 << 20),
                config.event_buffer,
                config.tombstone_retention,
            )?;
            serve(listener, config, clock, shutdown, Arc::new(store)).await
        }
        StoreKind::Etcd => {
            let store = EtcdStore::open(
                etcd_options(&config)?,
                &config.etcd_prefix,
                config.event_buffer,
                config.tombstone_retention,
            )
            .await?;
            serve(listener, config, clock, shutdown, Arc::new(store)).await
        }
    }
}

/// How to reach etcd, from the settings (files read here).
pub fn etcd_options(config: &Config) -> Result<EtcdOptions> {
    let read = |field: &'static str,
                path: &Option<std::path::PathBuf>|
     -> Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| Error::invalid(field, format!("{}: {e}", p.display())))
            })
            .transpose()
    };
    let identity = match (
        read("etcd_cert_file", &config.etcd_cert_file)?,
        read("etcd_key_file", &config.etcd_key_file)?,
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => None,
    };
    Ok(EtcdOptions {
        endpoints: config.etcd_endpoints.clone(),
        ca_pem: read("etcd_ca_file", &config.etcd_ca_file)?,
        identity_pem: identity,
        credentials: config.etcd_username.clone().zip(
            config
                .etcd_password
                .as_ref()
                .map(|p| p.expose().to_string()),
        ),
        timeout: Duration::from_secs(5),
        no_read_fence: !config.etcd_read_fence,
    })
}

/// The server over an open store, whichever backend.
async fn serve<S: SessionStore>(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    store: Arc<S>,
) -> Result<()> {
    let tokens = TokenGenerator::from_os().map_err(|e| Error::Server(e.to_string()))?;
    let policies = Arc::new(Policies::load(store.clone(), Policy::from(&config))?);
    let sessions = Arc::new(
        Sessions::new(
            store.clone(),
            clock.clone(),
            tokens,
            policies,
            config.touch_interval,
        )
        .with_login_window(config.user_state_retention),
    );
    // Policy changes whose enforcement a stop interrupted: finish them.
    for tenant in store.pending_enforcements()? {
        tracing::info!(tenant_id = %tenant, "resuming the enforcement of a policy change");
        policies::spawn_enforcement(sessions.clone(), tenant);
    }

    let (stop, stopped) = watch::channel(false);
    let sweeper = tokio::spawn(run_sweeper(
        sessions.clone(),
        config.sweep_interval,
        Retention {
            age: config.event_retention_age,
            count: config.event_retention_count,
            user_state: config.user_state_retention,
            audit: config.audit_retention,
            user_state_count: config.user_state_retention_count,
            audit_count: config.audit_retention_count,
        },
        stopped.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    // Health alone on a plaintext port, for probes that cannot speak TLS. It reveals only
    // SERVING or NOT_SERVING.
    let health_only = match config.health_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Server(format!("health_listen {addr}: {e}")))?;
            tracing::info!(%addr, "serving gRPC health (plaintext, no credentials)");
            let mut stopped = stopped.clone();
            let service = health_service.clone();
            Some(tokio::spawn(async move {
                let _ = Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await;
            }))
        }
    };
    let store_health = tokio::spawn(follow_store_health(
        store.clone(),
        health.clone(),
        stopped.clone(),
    ));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e| Error::Server(format!("reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    // v1alpha too: grpcurl 1.8 and many tools still ask for it.
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;

    let local = listener.local_addr().ok();
    // The address actually bound decides, not the configured one (tests bind port 0).
    if let Some(addr) = local {
        config
            .check_exposure(addr)
            .map_err(|e| Error::Server(e.to_string()))?;
        if !addr.ip().is_loopback() && (config.tls_cert.is_none() || !config.auth_enabled()) {
            tracing::warn!(%addr, "--insecure: serving beyond this machine without TLS or without authentication");
        }
    }
    if let Some(addr) = config.metrics_listen {
        crate::metrics::serve(addr);
    }
    let auth = Arc::new(Authenticator::from_config(&config));
    if !auth.enabled() {
        tracing::warn!("no API keys or client identities configured: every caller is an unauthenticated admin (loopback only, or --insecure)");
    }
    if config.tls_cert.is_none() {
        tracing::info!("plaintext gRPC (no tls_cert configured)");
    }
    let store_kind = match config.store {
        StoreKind::Sled => format!("sled at {}", config.data_dir.display()),
        StoreKind::Etcd => format!(
            "etcd {} under {:?}",
            config.etcd_endpoints.join(","),
            config.etcd_prefix
        ),
    };
    tracing::info!(addr = local.map(tracing::field::display), store = %store_kind, tls = config.tls_cert.is_some(), mtls = config.tls_client_ca.is_some(), "serving");

    let on_shutdown = {
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new calls, finishing in-flight ones");
            set_health(&health, ServingStatus::NotServing).await;
            let _ = stop.send(true);
        }
    };

    // No Nagle: a revocation event or a small reply must leave at once, not wait up to 40 ms for
    // a delayed ACK. TCP keepalive notices dead peers under long-lived event streams.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let mut server = Server::builder();
    if let Some(tls) = security::tls::server_tls(&config)? {
        server = server
            .tls_config(tls)
            .map_err(|e| Error::Server(format!("TLS configuration: {e}")))?;
    }
    let throttle = Arc::new(FailureThrottle::new(
        config.failed_validations_per_ip_per_minute,
        config.failed_validations_per_caller_per_minute,
    ));
    let served = server
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(config.max_concurrent_streams)
        .timeout(config.request_timeout)
        .trace_fn(|req| {
            let method = req.uri().path();
            if HOT_READS.contains(&method) {
                tracing::debug_span!("rpc", method = %method, request_id = %request_id(req))
            } else {
                tracing::info_span!("rpc", method = %method, request_id = %request_id(req))
            }
        })
        .layer(GuardLayer::new(auth, config.max_in_flight))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(limit!(SessionServiceServer::new(SessionApi::new(
            sessions.clone(),
            throttle,
        ))))
        .add_service(limit!(PolicyServiceServer::new(PolicyApi::new(
            sessions.clone(),
        ))))
        .add_service(limit!(AuditServiceServer::new(AuditApi::new(
            store.clone()
        ))))
        .add_service(limit!(BackupServiceServer::new(BackupApi::new(
            sessions.clone(),
            // Snapshots are staged beside sled's files; an etcd replica has none of its own.
            match config.store {
                StoreKind::Sled => config.data_dir.clone(),
                StoreKind::Etcd => std::env::temp_dir(),
            },
        ))))
        .add_service(limit!(EventServiceServer::new(EventApi::new(
            store.clone(),
            WatchSettings {
                heartbeat: config.heartbeat_interval,
                clock,
                // Streams end on shutdown, or graceful shutdown would wait for them forever.
                shutdown: stopped,
            },
            config.max_subscribers_per_caller,
        ))))
        .serve_with_incoming_shutdown(incoming, on_shutdown)
        .await
        .map_err(|e| Error::Server(e.to_string()));

    let _ = sweeper.await;
    let _ = store_health.await;
    if let Some(task) = health_only {
        let _ = task.await;
    }
    let closed = store.close().await;
    tracing::info!("stopped");
    served.and(closed)
}

/// The calls made tens of thousands of times a second, which log only on trouble: their span
/// opens only at `debug` level. At `info` it cost a fifth of their throughput (the registry and
/// the formatting of its fields, on every call), for lines they almost never write.
const HOT_READS: [&str; 3] = [
    "/session_authority.v1.SessionService/ValidateSession",
    "/session_authority.v1.SessionService/ValidateSessions",
    "/grpc.health.v1.Health/Check",
];

/// The caller's `x-request-id` if it sent a sane one (to correlate across services), else a new
/// one. It is a field of the call's span, so every log line of the call carries it.
fn request_id<B>(req: &http::Request<B>) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let given = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(id) => id.to_string(),
        None => format!(
            "{:x}-{:x}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
    }
}

/// Health is reported for the server as a whole ("") and for each service by name.
const HEALTH_NAMES: [&str; 6] = [
    "",
    session_service_server::SERVICE_NAME,
    event_service_server::SERVICE_NAME,
    policy_service_server::SERVICE_NAME,
    audit_service_server::SERVICE_NAME,
    backup_service_server::SERVICE_NAME,
];

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Reports NOT_SERVING while the store cannot take writes, so that load balancers and
/// orchestrators route around this instance: for sled after an I/O failure (until a restart), for
/// etcd while the cluster has no quorum or cannot be reached (SERVING again once it can).
async fn follow_store_health<S: SessionStore>(
    store: Arc<S>,
    reporter: HealthReporter,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ticks = 0u64;
    let mut serving = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        ticks += 1;
        if ticks % 20 == 1 {
            if let Ok(bytes) = store.size_on_disk() {
                crate::metrics::store_bytes(bytes);
            }
            if let Some(c) = store.cache_stats() {
                crate::metrics::session_cache(c.entries, c.bytes, c.misses);
            }
        }
        let healthy = store.is_healthy();
        if healthy != serving {
            serving = healthy;
            if healthy {
                tracing::info!("store available again: reporting SERVING");
                set_health(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::error!("store unavailable: reporting NOT_SERVING");
                set_health(&reporter, ServingStatus::NotServing).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A misspelt path would silently put a hot read back on the expensive span.
    #[test]
    fn hot_reads_name_real_methods() {
        let session = session_service_server::SERVICE_NAME;
        let health = tonic_health::pb::health_server::SERVICE_NAME;
        assert_eq!(
            HOT_READS,
            [
                format!("/{session}/ValidateSession").as_str(),
                format!("/{session}/ValidateSessions").as_str(),
                format!("/{health}/Check").as_str(),
            ]
        );
    }
}
