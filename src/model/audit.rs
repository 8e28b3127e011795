//! The audit trail: who did which administrative action, when. Recorded durably by the store
//! after the action succeeds, and listed by admins.

use crate::clock::Timestamp;

/// One administrative action.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    /// Assigned by the store: strictly increasing.
    pub id: u64,
    pub at: Timestamp,
    pub caller: String,
    pub role: String,
    pub action: String,
    pub tenant_id: Option<String>,
    pub detail: String,
}
