//! Pure types and the rules that are functions of them alone: sessions and their deadlines,
//! tenant policies, impossible travel, events, audit entries. The bottom layer: it depends only
//! on `clock`, `token` and `error`, and everything else (config, the domain, the store, the
//! gRPC layer) depends on it, never the other way round.

pub mod audit;
pub mod binding;
pub mod event;
pub mod flag;
pub mod login;
pub mod plan;
pub mod platform;
pub mod policy;
pub mod session;
pub mod travel;
