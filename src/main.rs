//! `session-authority`: parse configuration, set up logging, bind, serve until SIGINT or SIGTERM.
//! Or run an operator tool: `backup` (from a running server) or `restore` (offline).

use std::{io::IsTerminal, process::ExitCode, sync::Arc};

use session_authority::{
    backup,
    clock::SystemClock,
    config::{Config, LogFormat, Tool},
};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// sled copies a tree node on every write to it; under glibc's malloc, allocating and freeing
/// those copies took a quarter of the store writer's time at a million sessions.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load_with_tool(std::env::args_os()) {
        Ok((config, Some(tool))) => return run_tool(tool, &config).await,
        Ok((config, None)) => config,
        Err(e) => {
            eprintln!("session-authority: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %config.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match session_authority::run(listener, config, Arc::new(SystemClock), shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "session-authority failed");
            ExitCode::FAILURE
        }
    }
}

/// Runs an operator tool; exit code 0 on success, 1 on failure (with the reason on stderr).
async fn run_tool(tool: Tool, config: &Config) -> ExitCode {
    let result = match tool {
        Tool::Backup { server, out, ca } => fetch_backup(&server, ca.as_deref(), &out)
            .await
            .map(|entries| println!("backup written to {}: {entries} entries", out.display())),
        Tool::Restore {
            from,
            to_etcd: true,
            ..
        } => restore_to_etcd(&from, config)
            .await
            .map(|entries| {
                println!(
                    "restored {entries} records into etcd under {:?}",
                    config.etcd_prefix
                )
            })
            .map_err(|e| e.to_string()),
        Tool::Restore {
            from,
            into: Some(into),
            force,
            ..
        } => backup::restore(&from, &into, force)
            .map(|entries| println!("restored {entries} entries into {}", into.display()))
            .map_err(|e| e.to_string()),
        Tool::Restore { into: None, .. } => Err("restore needs --into or --to-etcd".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-authority: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn restore_to_etcd(
    from: &std::path::Path,
    config: &Config,
) -> session_authority::error::Result<u64> {
    let (_, entries) = backup::read_snapshot(from)?;
    let options = session_authority::service::etcd_options(config)?;
    session_authority::store::EtcdStore::restore_entries(options, &config.etcd_prefix, &entries)
        .await
}

async fn fetch_backup(
    server: &str,
    ca: Option<&std::path::Path>,
    out: &std::path::Path,
) -> Result<u64, String> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let mut endpoint = Channel::from_shared(server.to_string()).map_err(|e| e.to_string())?;
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("reading {}: {e}", ca.display()))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting to {server}: {e}"))?;
    // From the environment, never the command line (which other users can see).
    let key = std::env::var("SESSION_AUTHORITY_API_KEY").ok();
    backup::fetch(channel, key.as_deref(), out)
        .await
        .map_err(|e| e.to_string())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file or a log collector they are noise,
    // and writing them was a measurable part of every call's cost.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
