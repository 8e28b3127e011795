//! The background sweeper: ends sessions past their deadlines (one `Expired` event each), purges
//! tombstones, prunes the event log and the audit trail to their retention, and forgets per-user
//! records nobody needs (a chunk per round). Runs until its shutdown signal.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::Sessions;
use crate::store::{PolicyOf, SessionStore};

/// Sessions handled per store command, so a backlog never holds the writer for long.
const SWEEP_BATCH: usize = 512;

/// Per-user records looked at per round: a full pass over a million users takes about a
/// thousand rounds, each a short write.
const USER_STATE_CHUNK: usize = 1024;
/// Audit records pruned per store command.
const AUDIT_CHUNK: usize = 1024;

/// What the sweeper keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Events: the oldest kept, and the most kept.
    pub age: Duration,
    pub count: u64,
    /// A user's last known place.
    pub user_state: Duration,
    /// Audit records: the oldest kept, and the most kept.
    pub audit: Duration,
    pub audit_count: u64,
}

/// Sweeps every `interval` until `shutdown` turns true. Errors are logged and retried next round:
/// a failing disk must not stop the service from answering reads.
pub async fn run_sweeper<S: SessionStore>(
    sessions: Arc<Sessions<S>>,
    interval: Duration,
    retention: Retention,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut user_cursor = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if !sessions.store().runs_background_work() {
            continue; // another replica's turn
        }
        if let Err(e) = sweep_once(&sessions, retention, &mut user_cursor).await {
            tracing::warn!(error = %e, "sweep failed; retrying next round");
        }
    }
}

/// One round: expire everything due, prune the log and the audit trail, and purge the next chunk
/// of per-user records after `user_cursor` (which it moves on).
pub async fn sweep_once<S: SessionStore>(
    sessions: &Sessions<S>,
    retention: Retention,
    user_cursor: &mut Option<Vec<u8>>,
) -> crate::error::Result<()> {
    let store = sessions.store();
    let now = sessions.clock().now();
    let policies = sessions.policies().clone();
    let policy_of: PolicyOf = Arc::new(move |tenant: &str| policies.for_tenant(tenant));
    loop {
        let due = store.due(now, SWEEP_BATCH)?;
        let full = due.len() == SWEEP_BATCH;
        if due.is_empty() {
            break;
        }
        let expired = store.sweep(due, policy_of.clone(), now).await?;
        if expired > 0 {
            tracing::debug!(expired, "sweeper expired sessions");
        }
        if !full {
            break;
        }
    }
    let older_than = now.saturating_sub(retention.age);
    while store.prune_events(older_than, retention.count).await? > 0 {}
    let audit_older_than = now.saturating_sub(retention.audit);
    while store
        .prune_audit(audit_older_than, retention.audit_count, AUDIT_CHUNK)
        .await?
        == AUDIT_CHUNK
    {}
    let (purged, next) = store
        .purge_user_state(
            now.saturating_sub(retention.user_state),
            now,
            user_cursor.take(),
            USER_STATE_CHUNK,
        )
        .await?;
    if purged > 0 {
        tracing::debug!(purged, "sweeper forgot stale per-user records");
    }
    *user_cursor = next;
    Ok(())
}
