//! Rust client for session-authority.
//!
//! - [`Client`]: the generated gRPC stubs behind one connection and one API key, with typed
//!   shortcuts for the calls most services make (create, validate, revoke).
//! - [`CachedValidator`]: validates through the service on a miss, answers repeats from memory,
//!   and is kept correct by the event stream. See its docs for the exact guarantee.
//! - [`proto`]: every message and client stub of `session_authority.v1`, for everything else.
//!
//! ```no_run
//! # async fn demo() -> Result<(), session_authority_client::Error> {
//! use session_authority_client::{CacheConfig, CachedValidator, Client};
//!
//! let client = Client::connect("http://127.0.0.1:50051", Some("my-api-key")).await?;
//! let validator = CachedValidator::start(client, CacheConfig::default());
//! validator.ready().await;
//! match validator.validate("sat_...").await {
//!     Ok(session) => println!("user {}", session.user_id),
//!     Err(e) if e.is_invalid_session() => println!("log in again"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```

mod cache;
mod client;
pub mod proto;

pub use cache::{CacheConfig, CacheStats, CachedValidator, Eviction, EvictionCause};
pub use client::{Client, Created, Error};
