//! The one tower layer in front of every service: it authenticates the caller, checks the
//! method table, puts the [`Caller`] in the request's extensions, and sheds load (refusing at once
//! with RESOURCE_EXHAUSTED rather than queueing) when too many calls are in flight.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tonic::{
    transport::server::{TcpConnectInfo, TlsConnectInfo},
    Status,
};
use tower::{Layer, Service};

use super::{
    certificate_identities,
    methods::{lookup, Access},
    AuthError, Authenticator, Caller, Role,
};

/// Builds [`Guard`]s around the server's services.
#[derive(Clone)]
pub struct GuardLayer {
    auth: Arc<Authenticator>,
    in_flight: Arc<Semaphore>,
}

impl GuardLayer {
    pub fn new(auth: Arc<Authenticator>, max_in_flight: usize) -> Self {
        Self {
            auth,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            auth: self.auth.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    auth: Arc<Authenticator>,
    in_flight: Arc<Semaphore>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Decides whether `path` (whose table entry is `access`) may be called with these credentials;
/// the caller to record, if any.
fn authorize<B>(
    auth: &Authenticator,
    path: &str,
    access: Access,
    req: &http::Request<B>,
) -> Result<Option<Caller>, Status> {
    let required = match access {
        Access::Open => return Ok(None),
        Access::Reflection if auth.reflection_open() => return Ok(None),
        Access::Reflection => &[Role::Admin][..],
        Access::Roles(roles) => roles,
    };
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    // Parsing the certificate is the costly part: only done when no API key decides.
    let identities = || {
        req.extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(|c| certificate_identities(c.as_ref())))
            .unwrap_or_default()
    };
    let caller = auth
        .authenticate(authorization, identities)
        .map_err(|AuthError::Unauthenticated(why)| Status::unauthenticated(why))?;
    if !required.contains(&caller.role) {
        return Err(Status::permission_denied(format!(
            "{caller} may not call {path}"
        )));
    }
    Ok(Some(caller))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Answers `status` once the request body has been read (up to a size and a time bound).
/// Answering before the client has finished sending makes HTTP/2 reset the stream, which clients
/// report as a transport error instead of the status.
fn refuse<B, R>(
    req: http::Request<B>,
    status: Status,
) -> BoxFuture<http::Response<R>, std::convert::Infallible>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R: Default + Send + 'static,
{
    use http_body_util::{BodyExt, Limited};
    Box::pin(async move {
        // Requests here are small; a larger body is not read, only abandoned. A streaming client
        // may never end its side (reflection's does not), so wait only briefly.
        let drain = Limited::new(req.into_body(), 64 * 1024).collect();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), drain).await;
        Ok(status.into_http())
    })
}

impl<S, B, R> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The usual tower dance: use the instance that was polled ready, leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_owned();
        // Metric labels come from the method table only: a caller can send any path, and
        // unbounded label values would be a memory leak.
        // One table lookup per call serves both authorization and metrics.
        let entry = lookup(&path);
        let label = entry.map_or("unknown", |(p, _)| *p);
        let access = entry.map_or(Access::Roles(&[Role::Admin]), |(_, a)| *a);
        let caller = match authorize(&self.auth, &path, access, &req) {
            Ok(caller) => caller,
            Err(status) => {
                if status.code() == tonic::Code::PermissionDenied {
                    tracing::warn!(method = %path, reason = %status.message(), "call refused");
                }
                crate::metrics::rpc(label, code_name(status.code()), 0.0);
                return refuse(req, status);
            }
        };
        // Health checks are never shed: an overloaded server is still alive.
        let permit = match caller {
            None => None,
            Some(caller) => {
                req.extensions_mut().insert(caller);
                match self.in_flight.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        let status = Status::resource_exhausted(
                            "server overloaded: too many calls in flight; retry with backoff",
                        );
                        crate::metrics::rpc(label, "RESOURCE_EXHAUSTED", 0.0);
                        return refuse(req, status);
                    }
                }
            }
        };
        let started = std::time::Instant::now();
        Box::pin(async move {
            let response = inner.call(req).await.map(oversized_is_resource_exhausted);
            drop(permit);
            if let Ok(r) = &response {
                // A trailers-only answer (every error of a unary call) carries its status in the
                // headers; otherwise the call succeeded (or, for a stream, started).
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from);
                crate::metrics::rpc(label, code_name(code), started.elapsed().as_secs_f64());
            }
            response
        })
    }
}

/// tonic answers an over-limit request with OUT_OF_RANGE; gRPC's own implementations (and so
/// clients' retry logic) use RESOURCE_EXHAUSTED. Such an answer is trailers-only, with the status
/// in the headers; only tonic's own message is translated, never the service's OUT_OF_RANGE.
fn oversized_is_resource_exhausted<R>(mut response: http::Response<R>) -> http::Response<R> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        // grpc-message is percent-encoded: spaces are %20.
        .is_some_and(|v| {
            v.as_bytes()
                .starts_with(b"Error,%20decoded%20message%20length%20too%20large")
        });
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// The caller the layer recorded for this request. Fails closed if there is none.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}
