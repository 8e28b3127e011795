//! The tonic layer and the one function that starts the server, used by `main` and the tests.
//!
//! Handlers only decode (see [`convert`]), call the domain, and encode; errors become `Status`
//! through the single mapping in `crate::error`.

pub mod convert;
mod events;
mod policies;
mod sessions;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{server::TcpIncoming, Server};
use tonic_health::{server::HealthReporter, ServingStatus};

pub use self::{events::EventApi, policies::PolicyApi, sessions::SessionApi};
use crate::{
    clock::Clock,
    config::Config,
    error::{Error, Result},
    events::subscription::WatchSettings,
    policy::{Policies, Policy},
    proto::{
        self,
        v1::{
            event_service_server::{self, EventServiceServer},
            policy_service_server::{self, PolicyServiceServer},
            session_service_server::{self, SessionServiceServer},
        },
    },
    sessions::{run_sweeper, Retention, Sessions},
    store::{SessionStore, SledStore},
    token::TokenGenerator,
};

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
    let store = Arc::new(SledStore::open(
        &config.data_dir,
        config.cache_mib.saturating_mul(1 << 20),
        config.event_buffer,
    )?);
    let tokens = TokenGenerator::from_os().map_err(|e| Error::Server(e.to_string()))?;
    let policies = Arc::new(Policies::load(store.clone(), Policy::from(&config))?);
    let sessions = Arc::new(Sessions::new(
        store.clone(),
        clock.clone(),
        tokens,
        policies,
        config.touch_interval,
    ));

    let (stop, stopped) = watch::channel(false);
    let sweeper = tokio::spawn(run_sweeper(
        sessions.clone(),
        config.sweep_interval,
        Retention {
            age: config.event_retention_age,
            count: config.event_retention_count,
        },
        stopped.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
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
    tracing::info!(addr = ?local, data_dir = %config.data_dir.display(), "serving");

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
    let served = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SessionServiceServer::new(SessionApi::new(sessions.clone())))
        .add_service(PolicyServiceServer::new(PolicyApi::new(sessions.clone())))
        .add_service(EventServiceServer::new(EventApi::new(
            store.clone(),
            WatchSettings {
                heartbeat: config.heartbeat_interval,
                clock,
                // Streams end on shutdown, or graceful shutdown would wait for them forever.
                shutdown: stopped,
            },
        )))
        .serve_with_incoming_shutdown(incoming, on_shutdown)
        .await
        .map_err(|e| Error::Server(e.to_string()));

    let _ = sweeper.await;
    let _ = store_health.await;
    let closed = store.close().await;
    tracing::info!("stopped");
    served.and(closed)
}

/// Health is reported for the server as a whole ("") and for each service by name.
const HEALTH_NAMES: [&str; 4] = [
    "",
    session_service_server::SERVICE_NAME,
    event_service_server::SERVICE_NAME,
    policy_service_server::SERVICE_NAME,
];

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Turns health NOT_SERVING once the store refuses writes (after an I/O failure), so that load
/// balancers and orchestrators route around this instance until it is restarted.
async fn follow_store_health<S: SessionStore>(
    store: Arc<S>,
    reporter: HealthReporter,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        if !store.is_healthy() {
            tracing::error!("store failed: reporting NOT_SERVING until restarted");
            set_health(&reporter, ServingStatus::NotServing).await;
            return;
        }
    }
}
