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
    // A stream held open for good: open to anyone it would be an unbounded, never-shed way to
    // tie up the server. Probes use Check (or the health-only port).
    ("/grpc.health.v1.Health/Watch", Access::Roles(READERS)),
    (
        "/session_authority.v1.SessionService/CreateSession",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/ValidateSession",
        Access::Roles(READERS),
    ),
    (
        "/session_authority.v1.SessionService/ValidateSessions",
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
        "/session_authority.v1.SessionService/GetBindingChallenge",
        Access::Roles(DATA_PLANE),
    ),
    (
        "/session_authority.v1.SessionService/RefreshBoundSession",
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
        "/session_authority.v1.BackupService/Backup",
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

/// The table's entry for `path`, if it has one.
pub fn lookup(path: &str) -> Option<&'static (&'static str, Access)> {
    METHODS.iter().find(|(p, _)| *p == path)
}

/// Who may call `path`. Unknown paths are for admins only (they get UNIMPLEMENTED from the
/// router, and nobody else learns even that).
pub fn access(path: &str) -> Access {
    lookup(path).map_or(Access::Roles(ADMIN), |(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;

    /// Every method of every service the server registers, from the compiled descriptor sets.
    fn served_methods() -> BTreeSet<String> {
        let sets = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut out = BTreeSet::new();
        for bytes in sets {
            let set = prost_types::FileDescriptorSet::decode(bytes).expect("descriptor set");
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        out.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_served_method_is_in_the_table_and_nothing_else_is() {
        let served = served_methods();
        let table: BTreeSet<String> = METHODS.iter().map(|(p, _)| p.to_string()).collect();
        let unguarded: Vec<_> = served.difference(&table).collect();
        assert!(
            unguarded.is_empty(),
            "methods missing from the access table: {unguarded:?}"
        );
        let stale: Vec<_> = table.difference(&served).collect();
        assert!(
            stale.is_empty(),
            "table entries for methods nobody serves: {stale:?}"
        );
    }

    #[test]
    fn unknown_methods_are_for_admins_only() {
        assert_eq!(
            access("/evil.Service/Backdoor"),
            Access::Roles(&[Role::Admin])
        );
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
    }
}
