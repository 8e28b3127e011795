//! `SessionService`: decode, call the domain, encode. No logic of its own.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    error::Error,
    security::{layer::caller, throttle::FailureThrottle, Caller},
};

use super::convert::{
    self, cookie_to_proto, id_field, revoke_ids, revoke_reason, session_id_field, validate_device,
    validate_tokens_count,
};
use crate::{
    model::session::RevokeReason,
    proto::v1::{self as pb, session_service_server::SessionService},
    sessions::{ListQuery, MatchQuery, NewSession, Sessions},
    store::{RevokeTarget, SessionStore},
};

/// The gRPC face of [`Sessions`].
pub struct SessionApi<S> {
    sessions: Arc<Sessions<S>>,
    throttle: Arc<FailureThrottle>,
}

impl<S> SessionApi<S> {
    pub fn new(sessions: Arc<Sessions<S>>, throttle: Arc<FailureThrottle>) -> Self {
        Self { sessions, throttle }
    }
}

/// PERMISSION_DENIED unless the caller may act on `tenant_id`.
pub(super) fn check_tenant(caller: &Caller, tenant_id: &str) -> Result<(), Status> {
    if caller.may_access(tenant_id) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "tenant_id: {caller} is bound to another tenant"
        )))
    }
}

impl<S: SessionStore> SessionApi<S> {
    /// Records a revocation in the audit trail if it is administrative: made by an admin, or for
    /// an admin reason.
    /// The reason of a revoke asked for without one: a service-role caller (a backend) revokes
    /// for its user, who logs out; an admin revokes for itself.
    fn unspecified_reason(caller: &Caller) -> RevokeReason {
        match caller.role {
            crate::config::Role::Service => RevokeReason::UserLogout,
            _ => RevokeReason::Admin,
        }
    }

    async fn audit_revoke(
        &self,
        caller: &Caller,
        action: &str,
        tenant_id: Option<&str>,
        reason: RevokeReason,
        detail: String,
    ) -> Result<(), Status> {
        if caller.role == crate::config::Role::Admin || reason == RevokeReason::Admin {
            self.sessions
                .audit(
                    &caller.name,
                    caller.role_name(),
                    action,
                    tenant_id,
                    format!("reason={reason:?} {detail}"),
                )
                .await?;
        }
        Ok(())
    }

    /// Validates one token for `caller`, for ValidateSession and ValidateSessions alike: another
    /// tenant's session is as invalid as an unknown one, and every invalid token counts against
    /// the caller (and the client's IP, if known) in the throttle. A valid token is always
    /// answered; an invalid one from a client IP over its limit gets RESOURCE_EXHAUSTED.
    async fn validate_for(
        &self,
        caller: &Caller,
        token: &str,
        touch: bool,
        device: Option<crate::model::session::Device>,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<crate::model::session::Session, Error> {
        let validated = self
            .sessions
            .validate(token, touch, device, caller.tenant.as_deref())
            .await;
        if matches!(validated, Err(Error::SessionNotValid)) {
            self.throttle.record_failure(&caller.name, client_ip, token);
            if self.throttle.ip_blocked(client_ip) {
                return Err(Error::ResourceExhausted(
                    "too many failed validations from this client; retry later".into(),
                ));
            }
        }
        validated
    }

    /// A session the caller may see; another tenant's is NOT_FOUND, as if it did not exist.
    fn visible(
        &self,
        caller: &Caller,
        id: &crate::token::SessionId,
    ) -> Result<crate::model::session::Session, Status> {
        let session = self.sessions.get(id)?;
        if !caller.may_access(&session.tenant_id) {
            return Err(Error::SessionNotFound(*id).into());
        }
        Ok(session)
    }
}

fn ids(ids: Vec<crate::token::SessionId>) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

#[tonic::async_trait]
impl<S: SessionStore> SessionService for SessionApi<S> {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let caller = caller(&request)?;
        let new = NewSession::try_from(request.into_inner())?;
        check_tenant(&caller, &new.tenant_id)?;
        let created = self.sessions.create(new).await?;
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some((&created.session).into()),
            token: created.token.expose().to_string(),
            evicted_session_ids: ids(created.evicted),
            sequence: created.sequence,
            cookie: Some(cookie_to_proto(&created.cookie)),
            next_challenge_expires_at: created
                .next_challenge
                .as_ref()
                .map(|c| convert::timestamp(c.expires_at)),
            next_challenge: created
                .next_challenge
                .map(|c| c.challenge)
                .unwrap_or_default(),
        }))
    }

    async fn validate_session(
        &self,
        request: Request<pb::ValidateSessionRequest>,
    ) -> Result<Response<pb::ValidateSessionResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let client_ip = r
            .device
            .as_ref()
            .and_then(|d| d.ip.parse::<std::net::IpAddr>().ok());
        let device = validate_device(r.device)?;
        let touch = r.touch.unwrap_or(true);
        let session = self
            .validate_for(&caller, &r.token, touch, device, client_ip)
            .await?;
        Ok(Response::new(pb::ValidateSessionResponse {
            session: Some(convert::validated(&session)),
        }))
    }

    async fn validate_sessions(
        &self,
        request: Request<pb::ValidateSessionsRequest>,
    ) -> Result<Response<pb::ValidateSessionsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        validate_tokens_count(r.tokens.len())?;
        let touch = r.touch.unwrap_or(true);
        let mut results = Vec::with_capacity(r.tokens.len());
        for token in &r.tokens {
            let session = match self.validate_for(&caller, token, touch, None, None).await {
                Ok(s) => Some(convert::validated(&s)),
                Err(Error::SessionNotValid) => None,
                Err(e) => return Err(e.into()),
            };
            results.push(pb::ValidationResult { session });
        }
        Ok(Response::new(pb::ValidateSessionsResponse { results }))
    }

    async fn rotate_session(
        &self,
        request: Request<pb::RotateSessionRequest>,
    ) -> Result<Response<pb::RotateSessionResponse>, Status> {
        let caller = caller(&request)?;
        let pb::RotateSessionRequest {
            token,
            privilege_change,
        } = request.into_inner();
        let rotated = match self
            .sessions
            .rotate(&token, caller.tenant.as_deref(), privilege_change)
            .await
        {
            Err(Error::SessionNotValid) => {
                self.throttle.record_failure(&caller.name, None, &token);
                return Err(Error::SessionNotValid.into());
            }
            other => other?,
        };
        Ok(Response::new(pb::RotateSessionResponse {
            session: Some((&rotated.session).into()),
            token: rotated.token.expose().to_string(),
            sequence: rotated.sequence,
            cookie: Some(cookie_to_proto(&rotated.cookie)),
        }))
    }

    async fn get_binding_challenge(
        &self,
        request: Request<pb::GetBindingChallengeRequest>,
    ) -> Result<Response<pb::GetBindingChallengeResponse>, Status> {
        let caller = caller(&request)?;
        let id = session_id_field("session_id", &request.into_inner().session_id)?;
        let challenged = self
            .sessions
            .binding_challenge(&id, caller.tenant.as_deref())?;
        Ok(Response::new(pb::GetBindingChallengeResponse {
            challenge: challenged.challenge,
            expires_at: Some(convert::timestamp(challenged.expires_at)),
        }))
    }

    async fn refresh_bound_session(
        &self,
        request: Request<pb::RefreshBoundSessionRequest>,
    ) -> Result<Response<pb::RefreshBoundSessionResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        // A malformed id is as invalid as a bad proof: the answer never says which part failed.
        let refreshed = match session_id_field("session_id", &r.session_id) {
            Ok(id) => {
                self.sessions
                    .refresh_bound(&id, &r.proof, caller.tenant.as_deref())
                    .await
            }
            Err(_) => Err(Error::SessionNotValid),
        };
        let refreshed = match refreshed {
            Err(Error::SessionNotValid) => {
                self.throttle.record_failure(&caller.name, None, &r.proof);
                return Err(Error::SessionNotValid.into());
            }
            other => other?,
        };
        let (rotated, next) = (refreshed.rotated, refreshed.next_challenge);
        Ok(Response::new(pb::RefreshBoundSessionResponse {
            session: Some((&rotated.session).into()),
            token: rotated.token.expose().to_string(),
            sequence: rotated.sequence,
            cookie: Some(cookie_to_proto(&rotated.cookie)),
            next_challenge: next.challenge,
            next_challenge_expires_at: Some(convert::timestamp(next.expires_at)),
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let caller = caller(&request)?;
        let id = session_id_field("session_id", &request.into_inner().session_id)?;
        let session = self.visible(&caller, &id)?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some((&session).into()),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = caller(&request)?;
        let query = ListQuery::try_from(request.into_inner())?;
        check_tenant(&caller, &query.scope.tenant_id)?;
        let page = self.sessions.list(&query)?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: page.sessions.iter().map(Into::into).collect(),
            next_page_token: convert::page_token(page.next),
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let id = session_id_field("session_id", &r.session_id)?;
        let reason = revoke_reason(r.reason, Self::unspecified_reason(&caller))?;
        let target = RevokeTarget::Sessions {
            ids: vec![id],
            tenant: caller.tenant.clone(),
        };
        let outcome = self.sessions.revoke(target, reason).await?;
        // The session as the revoke left it: with no tombstones kept it is gone from the store.
        let session = outcome
            .sessions
            .into_iter()
            .next()
            .ok_or(Error::SessionNotFound(id))?;
        let detail = format!("session_id={id} revoked={}", !outcome.revoked.is_empty());
        self.audit_revoke(
            &caller,
            "RevokeSession",
            Some(&session.tenant_id),
            reason,
            detail,
        )
        .await?;
        Ok(Response::new(pb::RevokeSessionResponse {
            revoked: !outcome.revoked.is_empty(),
            session: Some((&session).into()),
            sequence: outcome.sequence,
        }))
    }

    async fn revoke_sessions(
        &self,
        request: Request<pb::RevokeSessionsRequest>,
    ) -> Result<Response<pb::RevokeSessionsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let target = revoke_ids(r.session_ids, caller.tenant.clone())?;
        let reason = revoke_reason(r.reason, Self::unspecified_reason(&caller))?;
        let outcome = self.sessions.revoke(target, reason).await?;
        let detail = format!("revoked={:?}", ids(outcome.revoked.clone()));
        self.audit_revoke(
            &caller,
            "RevokeSessions",
            caller.tenant.as_deref(),
            reason,
            detail,
        )
        .await?;
        Ok(Response::new(pb::RevokeSessionsResponse {
            revoked_session_ids: ids(outcome.revoked),
            sequence: outcome.sequence,
        }))
    }

    async fn revoke_user_sessions(
        &self,
        request: Request<pb::RevokeUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeUserSessionsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let tenant_id = id_field("tenant_id", r.tenant_id)?;
        check_tenant(&caller, &tenant_id)?;
        let user_id = id_field("user_id", r.user_id)?;
        let except = if r.except_session_id.is_empty() {
            None
        } else {
            Some(session_id_field("except_session_id", &r.except_session_id)?)
        };
        let default = if except.is_some() {
            RevokeReason::UserLogoutOthers
        } else {
            Self::unspecified_reason(&caller)
        };
        let reason = revoke_reason(r.reason, default)?;
        let detail = format!("user_id={user_id:?} except={except:?}");
        let target = RevokeTarget::User {
            tenant_id: tenant_id.clone(),
            user_id,
            except,
        };
        let outcome = self.sessions.revoke(target, reason).await?;
        let detail = format!("{detail} revoked={}", outcome.revoked.len());
        self.audit_revoke(
            &caller,
            "RevokeUserSessions",
            Some(&tenant_id),
            reason,
            detail,
        )
        .await?;
        Ok(Response::new(pb::RevokeUserSessionsResponse {
            revoked_session_ids: ids(outcome.revoked),
            sequence: outcome.sequence,
        }))
    }

    async fn revoke_sessions_matching(
        &self,
        request: Request<pb::RevokeSessionsMatchingRequest>,
    ) -> Result<Response<pb::RevokeSessionsMatchingResponse>, Status> {
        let caller = caller(&request)?;
        let query = MatchQuery::try_from(request.into_inner())?;
        check_tenant(&caller, &query.scope.tenant_id)?;
        let (tenant_id, dry_run) = (query.scope.tenant_id.clone(), query.dry_run);
        let detail = format!(
            "user_id={:?} filter={:?} reason={:?}",
            query.scope.user_id, query.filter, query.reason
        );
        let matched = self.sessions.revoke_matching(query).await?;
        if !dry_run {
            self.sessions
                .audit(
                    &caller.name,
                    caller.role_name(),
                    "RevokeSessionsMatching",
                    Some(&tenant_id),
                    format!("{detail} revoked={}", matched.matched),
                )
                .await?;
        }
        Ok(Response::new(pb::RevokeSessionsMatchingResponse {
            matched: matched.matched,
            sample: matched.sample.iter().map(Into::into).collect(),
            sequence: matched.sequence,
        }))
    }

    async fn get_session_stats(
        &self,
        request: Request<pb::GetSessionStatsRequest>,
    ) -> Result<Response<pb::GetSessionStatsResponse>, Status> {
        let caller = caller(&request)?;
        let tenant_id = id_field("tenant_id", request.into_inner().tenant_id)?;
        check_tenant(&caller, &tenant_id)?;
        let stats = self.sessions.stats(&tenant_id).await?;
        Ok(Response::new(pb::GetSessionStatsResponse {
            live_sessions: stats.live_sessions,
            distinct_users: stats.distinct_users,
            flagged_sessions: stats.flagged_sessions,
            created_last_24h: stats.created_last_24h,
            revoked_last_24h: stats
                .revoked_last_24h
                .iter()
                .map(|(reason, n)| {
                    (
                        convert::revoke_reason_to_proto(*reason)
                            .as_str_name()
                            .to_string(),
                        *n,
                    )
                })
                .collect(),
            expired_last_24h: stats.expired_last_24h,
            new_device_logins_last_24h: stats.new_device_logins_last_24h,
            new_place_logins_last_24h: stats.new_place_logins_last_24h,
        }))
    }
}
