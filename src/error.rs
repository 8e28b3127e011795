//! The service's one error type and its one mapping to `tonic::Status`.
//!
//! The domain and the store return [`Error`]; only [`From<Error> for Status`] decides what a
//! caller sees. Anything about a token says exactly "session not valid", whatever the cause.

use tonic::{Code, Status};

use crate::token::SessionId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field failed validation. `field` is the proto field name.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// The token is unknown, malformed, expired or revoked. One variant for all four, so no code
    /// path can tell a caller which it was.
    #[error("session not valid")]
    SessionNotValid,

    /// An admin call named a session the service does not know.
    #[error("session {0} not found")]
    SessionNotFound(SessionId),

    /// A limit of the tenant's policy refuses the request (session limit, login quota).
    #[error("{0}")]
    ResourceExhausted(String),

    /// The store is out of space (etcd's NOSPACE alarm): it takes deletes only, so creations
    /// are refused and revocations are made by deleting (see the etcd backend).
    #[error("{0}")]
    StoreFull(String),

    /// One write would change more than the store can commit atomically (etcd's limit on a
    /// transaction's operations and compares): refused whole, nothing written.
    #[error("{0}")]
    WriteTooLarge(String),

    /// The tenant's policy does not allow what was asked (e.g. "remember me").
    #[error("{0}")]
    FailedPrecondition(String),

    /// A security rule refuses the request (e.g. impossible travel).
    #[error("{0}")]
    PermissionDenied(String),

    /// The store could not read or write. The request may or may not have taken effect only if it
    /// was a write that was applied but not flushed; callers should retry idempotently.
    #[error("storage unavailable: {0}")]
    Storage(String),

    /// The store's disk failed under a read or write (a full disk, say). Unlike `Storage`, it
    /// says the store cannot be trusted to write again until a restart: the store turns
    /// unhealthy (health NOT_SERVING) on it.
    #[error("storage unavailable: {0}")]
    StorageFailed(String),

    /// The service is stopping and takes no more writes.
    #[error("service is shutting down")]
    ShuttingDown,

    /// The data directory holds something this service must not open or overwrite.
    #[error("refusing to open the data directory: {0}")]
    DataDir(String),

    /// The server could not start or stopped abnormally (never sent to a caller).
    #[error("server: {0}")]
    Server(String),

    /// An event cursor is older than the oldest kept event, or beyond the newest one.
    #[error(
        "after_sequence {after} is outside the event log (oldest kept {oldest}, head {head}): \
         drop every cached session and watch again from the head"
    )]
    CursorOutOfRange { after: u64, oldest: u64, head: u64 },

    /// An event cursor from another timeline of the log (the store was restored from a backup).
    #[error(
        "log_epoch {given} is not this log's epoch ({current}): the store was restored from a          backup, so sequence numbers after its head mean other events; drop every cached session          and watch again from the head"
    )]
    LogEpochChanged { given: u64, current: u64 },

    /// An event stream ended early (shutdown); the message says where to resume.
    #[error("{0}")]
    StreamEnded(String),
}

impl Error {
    /// The store could not read or write (either kind): a planner's result then carries no plan
    /// to apply.
    pub fn is_storage(&self) -> bool {
        matches!(self, Error::Storage(_) | Error::StorageFailed(_))
    }

    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::SessionNotValid => Code::Unauthenticated,
            Error::SessionNotFound(_) => Code::NotFound,
            Error::ResourceExhausted(_) | Error::StoreFull(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) | Error::WriteTooLarge(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Storage(_)
            | Error::StorageFailed(_)
            | Error::ShuttingDown
            | Error::DataDir(_)
            | Error::Server(_)
            | Error::StreamEnded(_) => Code::Unavailable,
            Error::CursorOutOfRange { .. } | Error::LogEpochChanged { .. } => Code::OutOfRange,
        };
        if matches!(
            e,
            Error::Storage(_)
                | Error::StorageFailed(_)
                | Error::DataDir(_)
                | Error::Server(_)
                | Error::StoreFull(_)
        ) {
            tracing::warn!(error = %e, "request failed: service unavailable");
        }
        let mut status = Status::new(code, e.to_string());
        if let Error::CursorOutOfRange { oldest, head, .. } = e {
            // Also as metadata, so a client need not parse the message.
            let metadata = status.metadata_mut();
            metadata.insert("oldest-sequence", oldest.into());
            metadata.insert("head-sequence", head.into());
        }
        status
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
