//! Compiles `proto/` with protox (pure Rust: a fresh machine needs no system `protoc`), generates
//! the tonic server traits, and writes the descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/session_authority/v1/sessions.proto",
    "proto/session_authority/v1/events.proto",
    "proto/session_authority/v1/policies.proto",
    "proto/session_authority/v1/audit.proto",
    "proto/session_authority/v1/backup.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=src/store/etcd/proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set itself; reflection needs it.
    fs::write(
        out_dir.join("session_authority_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    // The messages and client stubs live in the client crate (with the hand-written, redacting
    // `Debug` of the token-bearing ones); only the server traits are generated here.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(
            ".session_authority.v1",
            "::session_authority_client::proto::v1",
        )
        .compile_fds(fds)?;
    compile_etcd(&out_dir)?;
    Ok(())
}

/// etcd's v3 API, for the etcd store backend: client stubs only, in their own packages.
fn compile_etcd(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(
        [
            "etcd/api/etcdserverpb/rpc.proto",
            "etcd/api/mvccpb/kv.proto",
            "etcd/api/authpb/auth.proto",
        ],
        ["src/store/etcd/proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .out_dir(out_dir)
        .compile_fds(fds)?;
    Ok(())
}
