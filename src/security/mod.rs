//! Who is calling and what they may do: caller identity (API keys, client certificates), the
//! per-method role table, tenant binding, and abuse resistance (throttling of failed
//! validations, load shedding). Authorization happens in one tower layer before any handler runs.
//!
//! When no credential is configured at all, authentication is off: every caller is an anonymous
//! admin. `Config::validate` allows that only on loopback (or with `--insecure`), so that the
//! service runs out of the box on a developer machine and nowhere else.

pub mod layer;
pub mod methods;
pub mod throttle;
pub mod tls;

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;
pub use crate::config::Role;

/// An authenticated caller, put in each request's extensions by the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The configured name of the key or certificate identity; `anonymous` when auth is off.
    pub name: String,
    pub role: Role,
    /// If set, the caller may only see and touch this tenant.
    pub tenant: Option<String>,
}

impl Caller {
    /// The caller when authentication is off.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
            tenant: None,
        }
    }

    /// Whether this caller may act on `tenant_id`.
    pub fn may_access(&self, tenant_id: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant_id)
    }
}

impl Caller {
    /// The role as the audit trail writes it.
    pub fn role_name(&self) -> &'static str {
        match self.role {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Subscriber => "subscriber",
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.name, self.role)
    }
}

struct ApiKey {
    hash: [u8; 32],
    caller: Caller,
}

struct CertIdentity {
    identity: String,
    caller: Caller,
}

/// Maps credentials to callers.
pub struct Authenticator {
    enabled: bool,
    api_keys: Vec<ApiKey>,
    identities: Vec<CertIdentity>,
    reflection_open: bool,
}

/// Why a request has no caller.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials, or credentials that match nothing.
    Unauthenticated(&'static str),
}

impl Authenticator {
    pub fn from_config(config: &Config) -> Self {
        let api_keys = config
            .api_keys
            .iter()
            .filter_map(|k| {
                let mut hash = [0u8; 32];
                // Validated as 64 hex characters by Config::validate.
                hex::decode_to_slice(&k.sha256, &mut hash).ok()?;
                Some(ApiKey {
                    hash,
                    caller: Caller {
                        name: k.name.clone(),
                        role: k.role,
                        tenant: k.tenant.clone(),
                    },
                })
            })
            .collect();
        let identities = config
            .client_identities
            .iter()
            .map(|c| CertIdentity {
                identity: c.identity.clone(),
                caller: Caller {
                    name: c.identity.clone(),
                    role: c.role,
                    tenant: c.tenant.clone(),
                },
            })
            .collect();
        Self {
            enabled: config.auth_enabled(),
            api_keys,
            identities,
            reflection_open: config.reflection_open,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn reflection_open(&self) -> bool {
        self.reflection_open
    }

    /// The caller presenting `authorization` (a header value) and/or a client certificate, whose
    /// `identities` (its CN as `CN=...` and its SANs) are only worked out when no API key decides.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        identities: impl FnOnce() -> Vec<String>,
    ) -> Result<Caller, AuthError> {
        if !self.enabled {
            return Ok(Caller::anonymous());
        }
        if let Some(header) = authorization {
            let key = header
                .strip_prefix(b"Bearer ")
                .ok_or(AuthError::Unauthenticated(
                    "authorization must be \"Bearer <api key>\"",
                ))?;
            let hash: [u8; 32] = Sha256::digest(key).into();
            // Compare with every key, in constant time each, so timing says nothing about
            // which key (or how much of one) matched.
            let mut found = None;
            for k in &self.api_keys {
                if bool::from(k.hash.ct_eq(&hash)) {
                    found = Some(&k.caller);
                }
            }
            return found
                .cloned()
                .ok_or(AuthError::Unauthenticated("unknown API key"));
        }
        if self.identities.is_empty() {
            return Err(AuthError::Unauthenticated(
                "credentials required: an API key (authorization: Bearer ...)",
            ));
        }
        let identities = identities();
        self.identities
            .iter()
            .find(|c| identities.contains(&c.identity))
            .map(|c| c.caller.clone())
            .ok_or(AuthError::Unauthenticated(
                "credentials required: an API key (authorization: Bearer ...) or a known client certificate",
            ))
    }
}

/// The names a client certificate can be matched by: `CN=<common name>` and every DNS, URI and
/// email subject alternative name.
pub fn certificate_identities(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| format!("CN={cn}"))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) | GeneralName::RFC822Name(n) => {
                    out.push((*n).to_string())
                }
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    fn config_with_key(key: &str, role: Role, tenant: Option<&str>) -> Config {
        Config {
            api_keys: vec![ApiKeyConfig {
                name: "web".into(),
                sha256: hex::encode(Sha256::digest(key.as_bytes())),
                role,
                tenant: tenant.map(String::from),
            }],
            ..Config::default()
        }
    }

    #[test]
    fn api_keys_are_matched_by_hash() {
        let auth =
            Authenticator::from_config(&config_with_key("s3cret", Role::Service, Some("acme")));
        let caller = auth
            .authenticate(Some(b"Bearer s3cret"), Vec::new)
            .expect("known key");
        assert_eq!(caller.role, Role::Service);
        assert!(caller.may_access("acme") && !caller.may_access("globex"));
        assert!(auth.authenticate(Some(b"Bearer wrong"), Vec::new).is_err());
        assert!(auth.authenticate(Some(b"s3cret"), Vec::new).is_err());
        assert!(auth.authenticate(None, Vec::new).is_err());
    }

    #[test]
    fn without_credentials_configured_everyone_is_an_anonymous_admin() {
        let auth = Authenticator::from_config(&Config::default());
        assert_eq!(auth.authenticate(None, Vec::new), Ok(Caller::anonymous()));
    }
}
