//! The background sweeper: ends sessions past their deadlines (one `Expired` event each), purges
//! tombstones, prunes the event log and the audit trail to their retention, and forgets per-user
//! records nobody needs (a chunk per round). Runs until its shutdown signal.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::Sessions;
use crate::{clock::Timestamp, store::SessionStore};

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
    /// A user's last known place and login history: the oldest kept, and the most kept (both
    /// kinds together; those last written longest ago go first).
    pub user_state: Duration,
    pub user_state_count: u64,
    /// Audit records: the oldest kept, and the most kept.
    pub audit: Duration,
    pub audit_count: u64,
}

/// Where the sweeper's walk over per-user records is, and what it counted on the way: the
/// count cap on places and login histories is applied from what a whole pass saw, on the next
/// pass (a count needs the whole store; a pass reads it a chunk a round).
#[derive(Debug, Default)]
pub struct UserStatePass {
    cursor: Option<Vec<u8>>,
    /// Places and login histories kept so far in this pass, by the hour they were last written.
    hours: BTreeMap<u64, u64>,
    /// Those last written before this go too: what the count cap left of the last whole pass.
    cutoff: Timestamp,
}

const HOUR_MS: u64 = 3_600_000;

impl UserStatePass {
    /// Counts a page's kept records; at the end of a pass, the cutoff that keeps at most
    /// `most` of them (whole hours, newest first).
    fn count(&mut self, kept: &[Timestamp], next: Option<Vec<u8>>, most: u64) {
        for at in kept {
            *self.hours.entry(at.as_millis() / HOUR_MS).or_default() += 1;
        }
        self.cursor = next;
        if self.cursor.is_some() {
            return;
        }
        let mut total = 0u64;
        self.cutoff = Timestamp::from_millis(0);
        for (hour, n) in self.hours.iter().rev() {
            total += n;
            if total > most {
                self.cutoff = Timestamp::from_millis((hour + 1) * HOUR_MS);
                break;
            }
        }
        self.hours.clear();
    }
}

/// Sweeps every `interval` until `shutdown` turns true. Errors are logged and retried next round:
/// a failing disk must not stop the service from answering reads.
pub async fn run_sweeper<S: SessionStore>(
    sessions: Arc<Sessions<S>>,
    interval: Duration,
    retention: Retention,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut user_pass = UserStatePass::default();
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
        if let Err(e) = sweep_once(&sessions, retention, &mut user_pass).await {
            tracing::warn!(error = %e, "sweep failed; retrying next round");
        }
    }
}

/// One round: expire everything due, prune the log and the audit trail, and purge the next chunk
/// of per-user records of `user_pass` (which it moves on).
pub async fn sweep_once<S: SessionStore>(
    sessions: &Sessions<S>,
    retention: Retention,
    user_pass: &mut UserStatePass,
) -> crate::error::Result<()> {
    let store = sessions.store();
    let now = sessions.clock().now();
    let policy_of = sessions.policies().policy_of();
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
    let older_than = now
        .saturating_sub(retention.user_state)
        .max(user_pass.cutoff);
    let page = store
        .purge_user_state(older_than, now, user_pass.cursor.take(), USER_STATE_CHUNK)
        .await?;
    if page.purged > 0 {
        tracing::debug!(
            purged = page.purged,
            "sweeper forgot stale per-user records"
        );
    }
    user_pass.count(&page.kept, page.next, retention.user_state_count);
    Ok(())
}
