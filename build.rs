//! Compiles `proto/` with protox (pure Rust: a fresh machine needs no system `protoc`), generates
//! the tonic client and server, and writes the descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/session_authority/v1/sessions.proto",
    "proto/session_authority/v1/events.proto",
    "proto/session_authority/v1/policies.proto",
    "proto/session_authority/v1/audit.proto",
    "proto/session_authority/v1/backup.proto",
];

/// Messages that carry a session token: their `Debug` is written by hand (in `src/proto.rs`) so
/// that a token can never reach a log through `{:?}`.
const SECRET_MESSAGES: &[&str] = &[
    ".session_authority.v1.CreateSessionResponse",
    ".session_authority.v1.ValidateSessionRequest",
    ".session_authority.v1.RotateSessionRequest",
    ".session_authority.v1.RotateSessionResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set itself; reflection needs it.
    fs::write(
        out_dir.join("session_authority_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug(SECRET_MESSAGES)
        .compile_fds(fds)?;
    Ok(())
}
