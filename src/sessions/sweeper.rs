//! The background sweeper: ends sessions past their deadlines (one `Expired` event each), purges
//! tombstones, and prunes the event log to its retention. Runs until its shutdown signal.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::Sessions;
use crate::store::{PolicyOf, SessionStore};

/// Sessions handled per store command, so a backlog never holds the writer for long.
const SWEEP_BATCH: usize = 512;

/// What the sweeper keeps of the event log.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub age: Duration,
    pub count: u64,
}

/// Sweeps every `interval` until `shutdown` turns true. Errors are logged and retried next round:
/// a failing disk must not stop the service from answering reads.
pub async fn run_sweeper<S: SessionStore>(
    sessions: Arc<Sessions<S>>,
    interval: Duration,
    retention: Retention,
    mut shutdown: watch::Receiver<bool>,
) {
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
        if let Err(e) = sweep_once(&sessions, retention).await {
            tracing::warn!(error = %e, "sweep failed; retrying next round");
        }
    }
}

/// One full pass: expire everything due, then prune the log.
pub async fn sweep_once<S: SessionStore>(
    sessions: &Sessions<S>,
    retention: Retention,
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
    Ok(())
}
