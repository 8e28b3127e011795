//! The connection to an etcd cluster: one gRPC channel per endpoint, failover between them,
//! authentication, and the few calls the backend makes. No etcd client crate fails over or resumes
//! watches (see `ETCD-NOTES`), so this layer does, and decides which failures may be retried.
//!
//! A read is retried on another endpoint after any transport failure or "no leader". A
//! transaction is retried only when it certainly never reached a server (the connection could
//! not be made): after that, its outcome is unknown, and the caller is told so (`Storage`), never
//! told it succeeded.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Request, Status,
};

use crate::error::{Error, Result};

/// etcd's v3 API, compiled from `src/store/etcd/proto` by `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs, dead_code)]
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb::{
    alarm_request::AlarmAction, auth_client::AuthClient, kv_client::KvClient,
    lease_client::LeaseClient, maintenance_client::MaintenanceClient, watch_client::WatchClient,
    AlarmRequest, AuthenticateRequest, CompactionRequest, DefragmentRequest, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseRevokeRequest, StatusRequest,
};
pub use pb::etcdserverpb::{
    compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse,
    RequestOp, TxnRequest, TxnResponse,
};

/// How to reach the cluster.
#[derive(Clone)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`, at least one.
    pub endpoints: Vec<String>,
    /// PEM of the CA that signed the members' certificates: required with https endpoints, and
    /// the only CA trusted (a private cluster's certificates come from its own CA; trusting the
    /// system's roots too would let any public CA vouch for a member).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key for client-certificate authentication.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// User and password, when the cluster has authentication on: https endpoints only, since
    /// etcd's Authenticate call carries the password as it is.
    pub credentials: Option<(String, String)>,
    /// Longest wait for one call.
    pub timeout: Duration,
    /// Turns off validate's read fence (see `etcd_read_fence`).
    pub no_read_fence: bool,
}

impl std::fmt::Debug for EtcdOptions {
    /// Never the password or the client key: options reach logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<PEM>"))
            .field(
                "identity_pem",
                &self.identity_pem.as_ref().map(|_| "<PEM, key redacted>"),
            )
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .field("timeout", &self.timeout)
            .field("no_read_fence", &self.no_read_fence)
            .finish()
    }
}

impl Default for EtcdOptions {
    /// No endpoints yet, no TLS or credentials, 5 s per call, with the read fence.
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            ca_pem: None,
            identity_pem: None,
            credentials: None,
            timeout: Duration::from_secs(5),
            no_read_fence: false,
        }
    }
}

/// Longest wait for the health probe's read.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A cluster connection shared by the store's tasks.
pub struct EtcdClient {
    channels: Vec<(String, Channel)>,
    /// The endpoint calls go to until it fails.
    current: AtomicUsize,
    credentials: Option<(String, String)>,
    token: Mutex<Option<MetadataValue<tonic::metadata::Ascii>>>,
}

/// Whether a failed call certainly never reached a server.
fn not_sent(status: &Status) -> bool {
    status.code() == Code::Unavailable && {
        let text = format!("{status:?}");
        text.contains("connect") || text.contains("Connection refused")
    }
}

/// Whether a read may be retried elsewhere.
fn retry_read(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    ) || status.message().contains("no leader")
}

/// etcd's answers in the service's terms.
pub fn storage_error(what: &str, status: &Status) -> Error {
    if status.code() == Code::ResourceExhausted && status.message().contains("space") {
        return Error::StoreFull(format!(
            "the etcd cluster is out of space (NOSPACE alarm: {}); creations are refused until an \
             operator compacts, defragments and disarms it; revocations still work",
            status.message()
        ));
    }
    Error::Storage(format!("etcd {what}: {}", status.message()))
}

impl EtcdClient {
    pub fn new(options: &EtcdOptions) -> Result<Self> {
        if options.endpoints.is_empty() {
            return Err(Error::invalid(
                "etcd_endpoints",
                "name at least one endpoint",
            ));
        }
        if options.credentials.is_some() {
            if let Some(url) = options
                .endpoints
                .iter()
                .find(|u| !u.starts_with("https://"))
            {
                return Err(Error::invalid(
                    "etcd_password",
                    format!(
                        "would be sent in cleartext to {url}: etcd credentials need https:// \
                         endpoints (with etcd_ca_file)"
                    ),
                ));
            }
        }
        let mut channels = Vec::new();
        for url in &options.endpoints {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::invalid("etcd_endpoints", format!("{url}: {e}")))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(options.timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if url.starts_with("https://") {
                let Some(ca) = &options.ca_pem else {
                    return Err(Error::invalid(
                        "etcd_ca_file",
                        format!("{url}: https endpoints need the CA that signed the members' certificates"),
                    ));
                };
                // This CA alone: no system roots.
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key)) = &options.identity_pem {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| Error::invalid("etcd_ca_file", e.to_string()))?;
            }
            channels.push((url.clone(), endpoint.connect_lazy()));
        }
        Ok(Self {
            channels,
            current: AtomicUsize::new(0),
            credentials: options.credentials.clone(),
            token: Mutex::new(None),
        })
    }

    fn channel(&self, attempt: usize) -> Channel {
        let i = (self.current.load(Ordering::Relaxed) + attempt) % self.channels.len();
        self.channels[i].1.clone()
    }

    /// Moves on to the endpoint after the one that just failed.
    fn fail_over(&self, attempt: usize) {
        let failed = (self.current.load(Ordering::Relaxed) + attempt) % self.channels.len();
        let _ = self.current.compare_exchange(
            failed,
            (failed + 1) % self.channels.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        tracing::debug!(endpoint = %self.channels[failed].0, "etcd endpoint failed; trying the next");
    }

    /// A request carrying the auth token, if the cluster wants one.
    async fn request<T>(&self, message: T) -> Result<Request<T>> {
        let mut request = Request::new(message);
        if let Some(token) = self.token().await? {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }

    async fn token(&self) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>> {
        let Some((name, password)) = &self.credentials else {
            return Ok(None);
        };
        if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(Some(t));
        }
        let mut last = None;
        for attempt in 0..self.channels.len() * 2 {
            let mut auth = AuthClient::new(self.channel(attempt));
            match auth
                .authenticate(AuthenticateRequest {
                    name: name.clone(),
                    password: password.clone(),
                })
                .await
            {
                Ok(reply) => {
                    let token = MetadataValue::try_from(reply.into_inner().token)
                        .map_err(|e| Error::Storage(format!("etcd auth token: {e}")))?;
                    *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                    return Ok(Some(token));
                }
                Err(s) if retry_read(&s) => {
                    self.fail_over(attempt);
                    last = Some(s);
                }
                Err(s) => return Err(storage_error("authentication", &s)),
            }
        }
        Err(storage_error(
            "authentication",
            &last.unwrap_or_else(|| Status::unavailable("no endpoint")),
        ))
    }

    /// Forgets the auth token after etcd refused it (they expire), so the next call gets one.
    fn drop_token(&self, status: &Status) {
        if status.code() == Code::Unauthenticated || status.message().contains("token") {
            *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Calls `call` on one endpoint after another until one answers, for calls that may be
    /// repeated safely (`idempotent`), or only while nothing was sent.
    async fn call<T, R, F, Fut>(
        &self,
        what: &str,
        message: T,
        idempotent: bool,
        call: F,
    ) -> Result<R>
    where
        T: Clone,
        F: Fn(Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<R>, Status>>,
    {
        let attempts = self.channels.len() * 3;
        let mut backoff = Duration::from_millis(20);
        let mut last = Status::unavailable("no attempt");
        for attempt in 0..attempts {
            let request = self.request(message.clone()).await?;
            match call(self.channel(attempt), request).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(s) => {
                    self.drop_token(&s);
                    let again = if idempotent {
                        retry_read(&s)
                    } else {
                        not_sent(&s)
                    } || s.code() == Code::Unauthenticated;
                    if !again {
                        return Err(storage_error(what, &s));
                    }
                    self.fail_over(attempt);
                    last = s;
                    if attempt + 1 >= self.channels.len() {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            }
        }
        Err(storage_error(what, &last))
    }

    /// A linearizable range read.
    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse> {
        self.call("range", request, true, |ch, r| async move {
            KvClient::new(ch).range(r).await
        })
        .await
    }

    /// A transaction. `Storage` when its outcome is unknown.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse> {
        self.call("txn", request, false, |ch, r| async move {
            KvClient::new(ch).txn(r).await
        })
        .await
    }

    /// Whether the cluster answers a linearizable read now (it has a leader and quorum), and
    /// whether it raised an out-of-space alarm.
    pub async fn probe(&self, key: Vec<u8>) -> Result<bool> {
        let read = RangeRequest {
            key,
            count_only: true,
            ..Default::default()
        };
        // A linearizable read answers in milliseconds with a quorum; without one it hangs.
        tokio::time::timeout(PROBE_TIMEOUT, self.range(read))
            .await
            .map_err(|_| {
                Error::Storage("etcd did not answer a linearizable read in time".into())
            })??;
        let alarms = self
            .call("alarm", AlarmRequest::default(), true, |ch, r| async move {
                MaintenanceClient::new(ch).alarm(r).await
            })
            .await?;
        // AlarmType 1 is NOSPACE.
        Ok(alarms.alarms.iter().any(|a| a.alarm == 1))
    }

    /// The status of the member answering.
    async fn status(&self) -> Result<pb::etcdserverpb::StatusResponse> {
        self.call(
            "status",
            StatusRequest::default(),
            true,
            |ch, r| async move { MaintenanceClient::new(ch).status(r).await },
        )
        .await
    }

    /// The backend's size on the member answering, in bytes.
    pub async fn db_size(&self) -> Result<u64> {
        Ok(u64::try_from(self.status().await?.db_size).unwrap_or(0))
    }

    /// What an operator does after a NOSPACE alarm (`etcdctl compact`, `defrag` on each member,
    /// `alarm disarm`): drops the history before the current revision, gives each member's
    /// freed pages back, and lifts the alarms. Defragmenting blocks each member while it runs.
    pub async fn free_space(&self) -> Result<()> {
        let revision = self.status().await?.header.map_or(0, |h| h.revision);
        let compact = CompactionRequest {
            revision,
            physical: true,
        };
        if let Err(e) = self
            .call("compact", compact, true, |ch, r| async move {
                KvClient::new(ch).compact(r).await
            })
            .await
        {
            // Compacted to this revision already: nothing more to drop.
            if !e.to_string().contains("compacted") {
                return Err(e);
            }
        }
        for (url, channel) in &self.channels {
            let request = self.request(DefragmentRequest {}).await?;
            MaintenanceClient::new(channel.clone())
                .defragment(request)
                .await
                .map_err(|s| storage_error(&format!("defragment {url}"), &s))?;
        }
        let alarms = self
            .call("alarm", AlarmRequest::default(), true, |ch, r| async move {
                MaintenanceClient::new(ch).alarm(r).await
            })
            .await?;
        for alarm in alarms.alarms {
            let disarm = AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                member_id: alarm.member_id,
                alarm: alarm.alarm,
            };
            self.call("alarm disarm", disarm, true, |ch, r| async move {
                MaintenanceClient::new(ch).alarm(r).await
            })
            .await?;
        }
        Ok(())
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64> {
        let request = LeaseGrantRequest { ttl, id: 0 };
        let reply = self
            .call("lease grant", request, false, |ch, r| async move {
                LeaseClient::new(ch).lease_grant(r).await
            })
            .await?;
        Ok(reply.id)
    }

    /// Renews lease `id` once; the seconds it has left (0 or less: it is gone).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        let reply = self
            .call("lease keep-alive", id, true, |ch, id| async move {
                let (metadata, extensions, id) = id.into_parts();
                let once = tokio_stream::iter([LeaseKeepAliveRequest { id }]);
                let mut request = Request::from_parts(metadata, extensions, once);
                request.set_timeout(Duration::from_secs(2));
                let mut stream = LeaseClient::new(ch)
                    .lease_keep_alive(request)
                    .await?
                    .into_inner();
                match stream.message().await? {
                    Some(reply) => Ok(tonic::Response::new(reply)),
                    None => Err(Status::unavailable("keep-alive stream closed")),
                }
            })
            .await?;
        Ok(reply.ttl)
    }

    /// Ends lease `id` now, deleting the keys attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<()> {
        self.call(
            "lease revoke",
            LeaseRevokeRequest { id },
            true,
            |ch, r| async move { LeaseClient::new(ch).lease_revoke(r).await },
        )
        .await
        .map(drop)
    }

    /// A watch stream on `[key, range_end)` from `start_revision`, on the current endpoint.
    pub async fn watch(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: i64,
        attempt: usize,
    ) -> Result<tonic::Streaming<pb::etcdserverpb::WatchResponse>> {
        use pb::etcdserverpb::{watch_request::RequestUnion, WatchCreateRequest, WatchRequest};
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key,
                range_end,
                start_revision,
                progress_notify: true,
                ..Default::default()
            })),
        };
        // The request stream stays open for the watch's life: closing it cancels the watch.
        use tokio_stream::StreamExt;
        let stream = tokio_stream::iter([create]).chain(tokio_stream::pending());
        let request = self.request(stream).await?;
        match WatchClient::new(self.channel(attempt)).watch(request).await {
            Ok(reply) => Ok(reply.into_inner()),
            Err(s) => {
                self.drop_token(&s);
                self.fail_over(attempt);
                Err(storage_error("watch", &s))
            }
        }
    }
}

// === request builders ===

/// `[key, end)` covering every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

pub fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

pub fn delete_range(key: Vec<u8>, range_end: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key,
                range_end,
                ..Default::default()
            },
        )),
    }
}

/// Holds while `key` was last written at or before `revision`, or does not exist: "unchanged
/// since a copy at `revision`" without keeping the key's own revision, but blind to a delete
/// after `revision` (see how `store::etcd` deletes guards).
pub fn not_written_after(key: Vec<u8>, revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Less as i32,
        target: compare::CompareTarget::Mod as i32,
        key,
        target_union: Some(compare::TargetUnion::ModRevision(
            revision.saturating_add(1),
        )),
        ..Default::default()
    }
}

/// The key's last modification is `revision` (0: the key does not exist).
pub fn unchanged(key: Vec<u8>, revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key,
        target_union: Some(compare::TargetUnion::ModRevision(revision)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(endpoints: &[&str]) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            ..EtcdOptions::default()
        }
    }

    fn refused_field(options: &EtcdOptions) -> Option<&'static str> {
        match EtcdClient::new(options) {
            Err(Error::InvalidArgument { field, .. }) => Some(field),
            _ => None,
        }
    }

    /// etcd's Authenticate call carries the password as it is: never over plain http.
    #[tokio::test]
    async fn credentials_over_http_are_refused() {
        let mut plain = options(&["https://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        let ca = rcgen::generate_simple_self_signed(vec!["etcd".into()]).expect("ca");
        plain.ca_pem = Some(ca.cert.pem().into_bytes());
        plain.credentials = Some(("root".into(), "hunter2".into()));
        assert_eq!(refused_field(&plain), Some("etcd_password"));
        plain.credentials = None;
        assert_eq!(
            refused_field(&plain),
            None,
            "http without credentials is allowed"
        );
    }

    /// With https, the given CA is the only one trusted, so it must be given.
    #[tokio::test]
    async fn https_endpoints_need_their_ca() {
        assert_eq!(
            refused_field(&options(&["https://10.0.0.1:2379"])),
            Some("etcd_ca_file")
        );
    }

    /// Options reach logs: their `Debug` shows neither the password nor the client key.
    #[test]
    fn debug_shows_no_secret() {
        let mut o = options(&["https://10.0.0.1:2379"]);
        o.credentials = Some(("root".into(), "hunter2".into()));
        o.identity_pem = Some((b"CERT".to_vec(), b"PRIVATE KEY BYTES".to_vec()));
        let shown = format!("{o:?}");
        assert!(shown.contains("root"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert!(!shown.contains("80, 82, 73"), "{shown}");
    }
}
