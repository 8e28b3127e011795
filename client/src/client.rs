//! A connection to session-authority with its credentials attached to every call.

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Channel, Endpoint},
    Code, Request, Status,
};

use crate::proto::v1::{
    self as pb, event_service_client::EventServiceClient,
    policy_service_client::PolicyServiceClient, session_service_client::SessionServiceClient,
};

/// What can go wrong talking to the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the API key is not a valid header value")]
    InvalidApiKey,
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] Status),
    #[error("the reply has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// The token is unknown, revoked, expired or malformed: the caller must log in again. Any
    /// other error says nothing about the session (the service may just be unreachable).
    pub fn is_invalid_session(&self) -> bool {
        matches!(self, Error::Rpc(s) if s.code() == Code::Unauthenticated)
    }

    /// The gRPC status code, if the service answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            request.metadata_mut().insert("authorization", key.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, ApiKey>;

/// One channel (HTTP/2 connection, reconnecting on its own) and one API key. Cheap to clone; the
/// clones share the connection.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    key: ApiKey,
}

/// A new session and the token to hand to the user agent. Its `Debug` redacts the token, so
/// `tracing::debug!(?created)` is safe.
#[derive(Clone)]
pub struct Created {
    pub session: pb::Session,
    /// The secret. Set it as the cookie value; never log it.
    pub token: String,
    /// Sessions of the same user revoked to stay within the per-user limit.
    pub evicted_session_ids: Vec<String>,
    /// The event that records the creation.
    pub sequence: u64,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("session", &self.session)
            .field("token", &"<redacted>")
            .field("evicted_session_ids", &self.evicted_session_ids)
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl Client {
    /// Connects to `endpoint` (e.g. `http://127.0.0.1:50051`; use [`Client::from_channel`] for
    /// TLS or custom settings).
    pub async fn connect(endpoint: &str, api_key: Option<&str>) -> Result<Self, Error> {
        let channel = Endpoint::from_shared(endpoint.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Self::from_channel(channel, api_key)
    }

    /// Uses a channel built by the caller.
    pub fn from_channel(channel: Channel, api_key: Option<&str>) -> Result<Self, Error> {
        let key = match api_key {
            Some(k) => Some(
                format!("Bearer {k}")
                    .parse()
                    .map_err(|_| Error::InvalidApiKey)?,
            ),
            None => None,
        };
        Ok(Client {
            channel,
            key: ApiKey(key),
        })
    }

    /// The full SessionService stub.
    pub fn sessions(&self) -> SessionServiceClient<Authed> {
        SessionServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    /// The EventService stub.
    pub fn events(&self) -> EventServiceClient<Authed> {
        EventServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    /// The PolicyService stub.
    pub fn policies(&self) -> PolicyServiceClient<Authed> {
        PolicyServiceClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    /// Starts a session for `user_id` of `tenant_id`.
    pub async fn create(
        &self,
        tenant_id: &str,
        user_id: &str,
        remember_me: bool,
    ) -> Result<Created, Error> {
        let r = self
            .sessions()
            .create_session(pb::CreateSessionRequest {
                tenant_id: tenant_id.to_owned(),
                user_id: user_id.to_owned(),
                remember_me,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(Created {
            session: r.session.ok_or(Error::MissingField("session"))?,
            token: r.token,
            evicted_session_ids: r.evicted_session_ids,
            sequence: r.sequence,
        })
    }

    /// Checks `token` with the service (no cache). `touch` slides the idle deadline.
    pub async fn validate(&self, token: &str, touch: bool) -> Result<pb::Session, Error> {
        self.sessions()
            .validate_session(pb::ValidateSessionRequest {
                token: token.to_owned(),
                touch: Some(touch),
                device: None,
            })
            .await?
            .into_inner()
            .session
            .ok_or(Error::MissingField("session"))
    }

    /// Revokes one session; the sequence of its event (wait for it on the stream to know every
    /// cache has dropped it). `Ok(false)` if it had already ended.
    pub async fn revoke(
        &self,
        session_id: &str,
        reason: pb::RevokeReason,
    ) -> Result<(bool, u64), Error> {
        let r = self
            .sessions()
            .revoke_session(pb::RevokeSessionRequest {
                session_id: session_id.to_owned(),
                reason: reason as i32,
            })
            .await?
            .into_inner();
        Ok((r.revoked, r.sequence))
    }

    /// Revokes every session of a user, optionally keeping one; the ids ended.
    pub async fn revoke_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        except_session_id: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        Ok(self
            .sessions()
            .revoke_user_sessions(pb::RevokeUserSessionsRequest {
                tenant_id: tenant_id.to_owned(),
                user_id: user_id.to_owned(),
                except_session_id: except_session_id.unwrap_or_default().to_owned(),
                reason: pb::RevokeReason::Unspecified as i32,
            })
            .await?
            .into_inner()
            .revoked_session_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every public type of this crate that holds a token, printed with `{:?}`.
    #[test]
    fn no_public_type_prints_a_token() {
        let token = "sat_THIS-IS-THE-SECRET-TOKEN-VALUE".to_string();
        let session = pb::Session {
            session_id: "id".into(),
            ..Default::default()
        };
        let printed = [
            format!(
                "{:?}",
                Created {
                    session: session.clone(),
                    token: token.clone(),
                    evicted_session_ids: vec![],
                    sequence: 1,
                }
            ),
            format!(
                "{:?}",
                pb::CreateSessionResponse {
                    session: Some(session.clone()),
                    token: token.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::ValidateSessionRequest {
                    token: token.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::ValidateSessionsRequest {
                    tokens: vec![token.clone(), token.clone()],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::RotateSessionRequest {
                    token: token.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::RotateSessionResponse {
                    session: Some(session.clone()),
                    token: token.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::RefreshBoundSessionResponse {
                    session: Some(session),
                    token: token.clone(),
                    ..Default::default()
                }
            ),
        ];
        for text in &printed {
            assert!(!text.contains("SECRET"), "a token was printed: {text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }
}
