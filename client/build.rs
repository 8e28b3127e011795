//! Generates the messages and client stubs of `session_authority.v1` from the repository's
//! `proto/` with protox (no system `protoc`). The server crate reuses these message types and
//! generates only its service traits, so each message has one Rust definition.

const PROTOS: &[&str] = &[
    "session_authority/v1/sessions.proto",
    "session_authority/v1/events.proto",
    "session_authority/v1/policies.proto",
    "session_authority/v1/audit.proto",
    "session_authority/v1/backup.proto",
];

/// Messages that carry a session token: their `Debug` is written by hand (in `src/proto.rs`) so
/// that a token can never reach a log through `{:?}`.
const SECRET_MESSAGES: &[&str] = &[
    ".session_authority.v1.CreateSessionResponse",
    ".session_authority.v1.ValidateSessionRequest",
    ".session_authority.v1.ValidateSessionsRequest",
    ".session_authority.v1.RotateSessionRequest",
    ".session_authority.v1.RotateSessionResponse",
    ".session_authority.v1.RefreshBoundSessionResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    let fds = protox::compile(PROTOS, ["../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .skip_debug(SECRET_MESSAGES)
        .compile_fds(fds)?;
    Ok(())
}
