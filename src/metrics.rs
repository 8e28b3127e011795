//! Prometheus metrics: names and the one place each is recorded. Served over plain HTTP on
//! `metrics_listen` when configured; with no recorder installed every call here is a no-op. A
//! leaf: it takes plain labels and imports nothing of the crate.
//!
//! | metric | type | labels | recorded in |
//! |---|---|---|---|
//! | `session_authority_rpc_total` | counter | method, code | the security layer, for every guarded call |
//! | `session_authority_rpc_duration_seconds` | histogram | method | the security layer |
//! | `session_authority_events_total` | counter | type (and reason for revocations) | the event bus, once durable |
//! | `session_authority_event_head` | gauge | | the event bus |
//! | `session_authority_event_subscribers` | gauge | | the event service |
//! | `session_authority_store_flush_seconds` | histogram | | the group committer (flush + fdatasync) |
//! | `session_authority_store_group_size` | histogram | | the group committer |
//! | `session_authority_store_bytes` | gauge | | the health loop, every few seconds |
//! | `session_authority_session_cache_entries` | gauge | | the health loop (sled: sessions in memory) |
//! | `session_authority_session_cache_bytes` | gauge | | the health loop (against `session_cache_mib`) |
//! | `session_authority_session_cache_misses_total` | counter | | the health loop (reads that went to disk) |
//! | `session_authority_failed_validations_total` | counter | caller | the throttle, per invalid token |
//! | `session_authority_failed_validations_over_limit_total` | counter | caller | the throttle, per invalid token beyond the caller's limit |

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Starts the HTTP exporter and installs the recorder. Only one recorder can exist per process:
/// a second server in the same process (tests) logs a warning and records nothing.
pub fn serve(addr: SocketAddr) {
    match PrometheusBuilder::new().with_http_listener(addr).build() {
        Ok((recorder, exporter)) => {
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder is already installed in this process");
                return;
            }
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "metrics exporter stopped");
                }
            });
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        }
        Err(e) => tracing::error!(error = %e, "cannot serve metrics"),
    }
}

pub fn rpc(method: &str, code: &str, seconds: f64) {
    metrics::counter!("session_authority_rpc_total", "method" => method.to_string(), "code" => code.to_string())
        .increment(1);
    metrics::histogram!("session_authority_rpc_duration_seconds", "method" => method.to_string())
        .record(seconds);
}

/// One durable event of kind `kind` (and, for revocations, why).
pub fn event(kind: &'static str, reason: Option<String>) {
    match reason {
        Some(reason) => metrics::counter!(
            "session_authority_events_total",
            "type" => kind,
            "reason" => reason
        ),
        None => metrics::counter!("session_authority_events_total", "type" => kind),
    }
    .increment(1);
}

pub fn event_head(head: u64) {
    metrics::gauge!("session_authority_event_head").set(head as f64);
}

pub fn subscribers(delta: f64) {
    metrics::gauge!("session_authority_event_subscribers").increment(delta);
}

pub fn flush(seconds: f64, group: usize) {
    metrics::histogram!("session_authority_store_flush_seconds").record(seconds);
    metrics::histogram!("session_authority_store_group_size").record(group as f64);
}

pub fn store_bytes(bytes: u64) {
    metrics::gauge!("session_authority_store_bytes").set(bytes as f64);
}

pub fn session_cache(entries: usize, bytes: usize, misses: u64) {
    metrics::gauge!("session_authority_session_cache_entries").set(entries as f64);
    metrics::gauge!("session_authority_session_cache_bytes").set(bytes as f64);
    metrics::counter!("session_authority_session_cache_misses_total").absolute(misses);
}

pub fn failed_validation(caller: &str) {
    metrics::counter!("session_authority_failed_validations_total", "caller" => caller.to_string())
        .increment(1);
}

pub fn failed_validations_over_limit(caller: &str) {
    metrics::counter!(
        "session_authority_failed_validations_over_limit_total",
        "caller" => caller.to_string()
    )
    .increment(1);
}
