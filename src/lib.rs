//! # session-authority
//!
//! The one place where a company's user sessions are created, checked, listed, limited and
//! revoked, served over gRPC and stored durably in an embedded sled database, or in an etcd
//! cluster shared by several replicas.
//!
//! Data flows one way: **gRPC layer → domain → store**; the store publishes **events** after the
//! flush that made them durable.
//!
//! # Layout
//!
//! - [`model`]: the bottom layer: pure types and rules (sessions and deadlines, policies,
//!   impossible travel, events, audit entries). Everything else depends on it, it on nothing.
//! - [`config`]: every setting, its default and its meaning; flags, environment and TOML file.
//! - [`service`]: the tonic layer (decode and validate requests, call the domain, encode replies)
//!   and [`run`], the one function that starts the server, for `main` and tests alike.
//! - [`sessions`]: the domain: create, validate, rotate, list, revoke under each tenant's policy;
//!   the policy registry; the background sweeper; event subscriptions (replay from the log, then
//!   live). No tonic, no sled.
//! - [`store`]: the only code that touches sled or etcd, behind the [`store::SessionStore`]
//!   trait: key encoding, records, the backup format; `sled_store` (the single-writer
//!   group-commit write path) and `etcd` (several replicas: an in-memory copy per replica fed by
//!   one watch, optimistic transactions, a shared read fence).
//! - [`events`]: the live fan-out of durable events (below the store, which publishes to it).
//! - [`metrics`]: Prometheus metrics, each recorded in one place; a leaf that takes plain labels.
//! - [`security`]: caller identity (API keys, client certificates), the per-method role table,
//!   tenant binding, throttling of failed validations, load shedding, TLS.
//! - [`token`]: session ids and secrets: generation (ChaCha20 seeded from the OS), the token's
//!   wire form, hashing. Nothing else touches a secret.
//! - [`backup`]: the backup file format, restore, and fetching a backup from a server.
//! - [`clock`]: injected time, so expiry is tested without sleeping.
//! - [`error`]: the error type and its one mapping to `tonic::Status`.
//! - [`proto`]: generated code and the descriptor set for reflection.

#![forbid(unsafe_code)]

pub mod backup;
pub mod clock;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod model;
pub mod proto;
pub mod security;
pub mod service;
pub mod sessions;
pub mod store;
pub mod token;

pub use service::run;
