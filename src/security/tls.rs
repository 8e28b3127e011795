//! TLS for the server: its certificate and key, and optionally the CA that client certificates
//! must be signed by (mutual TLS, required for every client when configured).

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{config::Config, error::Error};

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::Server(format!("reading {what} {}: {e}", path.display())))
}

/// The TLS settings, or `None` for plaintext.
pub fn server_tls(config: &Config) -> Result<Option<ServerTlsConfig>, Error> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read(cert, "tls_cert")?, read(key, "tls_key")?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.tls_client_ca {
        // Client authentication is required (not optional) once a CA is configured.
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "tls_client_ca")?));
    }
    Ok(Some(tls))
}
