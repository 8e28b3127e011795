//! Who may call what: one table, by gRPC method path. The layer in `security::layer` consults it
//! before any handler runs; a test checks that every RPC in the descriptor set appears here, so a
//! new RPC cannot ship unguarded.

use crate::config::Role;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials (health checks from load balancers and orchestrators).
    Open,
    /// Callers with one of these roles.
    Roles(&'static [Role]),
    /// Server reflection: admins, or anyone if `reflection_open`.
    Reflection,
}

const ADMIN: &[Role] = &[Role::Admin];
const DATA_PLANE: &[Role] = &[Role::Admin, Role::Service];
const READERS: &[Role] = &[Role::Admin, Role::Service, Role::Subscriber];

/// Every method the server exposes, and who may call it.
pub const METHODS: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/Check", Access::Open),
    ("/grpc.health.v1.Health/Watch", Access::Open),
    ("/grpc.health.v1.Health/List", Access::Open),
    (
        "/session_authority.v1.SessionService/CreateSession",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/ValidateSession",
        Access::Roles(READERS),
    ),
    (
        "/session_authority.v1.SessionService/RotateSession",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/GetSession",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/ListSessions",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/RevokeSession",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/RevokeSessions",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/RevokeUserSessions",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/RevokeSessionsMatching",
        Access::Roles(ADMIN),
    ),
    (
        "/session_authority.v1.SessionService/GetSessionStats",
        Access::Roles(ADMIN),
    ),
    (
        "/session_authority.v1.EventService/WatchEvents",
        Access::Roles(READERS),
    ),
    (
        "/session_authority.v1.PolicyService/GetPolicy",
        Access::Roles(ADMIN),
    ),
    (
        "/session_authority.v1.PolicyService/SetPolicy",
        Access::Roles(ADMIN),
    ),
    (
        "/session_authority.v1.PolicyService/ListPolicies",
        Access::Roles(ADMIN),
    ),
    (
        "/session_authority.v1.PolicyService/DeletePolicy",
        Access::Roles(ADMIN),
    ),
    (
        "/session_authority.v1.AuditService/ListAuditRecords",
        Access::Roles(ADMIN),
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Access::Reflection,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Access::Reflection,
    ),
];

/// Who may call `path`. Unknown paths are for admins only (they get UNIMPLEMENTED from the
/// router, and nobody else learns even that).
pub fn access(path: &str) -> Access {
    METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(Access::Roles(ADMIN), |(_, a)| *a)
}
