//! Generated messages and client stubs for `session_authority.v1`, and hand-written `Debug` for
//! the messages that carry a token (so that `{:?}` on a request or response can never print one).

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("session_authority.v1");
}

use std::fmt;

const REDACTED: &str = "<redacted>";

impl fmt::Debug for v1::CreateSessionResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateSessionResponse")
            .field("session", &self.session)
            .field("token", &REDACTED)
            .field("evicted_session_ids", &self.evicted_session_ids)
            .field("sequence", &self.sequence)
            .field("cookie", &self.cookie)
            .field("next_challenge", &self.next_challenge)
            .field("next_challenge_expires_at", &self.next_challenge_expires_at)
            .finish()
    }
}

impl fmt::Debug for v1::ValidateSessionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateSessionRequest")
            .field("token", &REDACTED)
            .field("touch", &self.touch)
            .field("device", &self.device)
            .finish()
    }
}

impl fmt::Debug for v1::ValidateSessionsRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateSessionsRequest")
            .field("tokens", &format_args!("<{} redacted>", self.tokens.len()))
            .field("touch", &self.touch)
            .finish()
    }
}

impl fmt::Debug for v1::RotateSessionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateSessionRequest")
            .field("token", &REDACTED)
            .field("privilege_change", &self.privilege_change)
            .finish()
    }
}

impl fmt::Debug for v1::RefreshBoundSessionResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshBoundSessionResponse")
            .field("session", &self.session)
            .field("token", &REDACTED)
            .field("sequence", &self.sequence)
            .field("cookie", &self.cookie)
            .field("next_challenge", &self.next_challenge)
            .field("next_challenge_expires_at", &self.next_challenge_expires_at)
            .finish()
    }
}

impl fmt::Debug for v1::RotateSessionResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateSessionResponse")
            .field("session", &self.session)
            .field("token", &REDACTED)
            .field("sequence", &self.sequence)
            .field("cookie", &self.cookie)
            .finish()
    }
}
