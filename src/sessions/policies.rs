//! The policy registry: every tenant's policy, stored durably by the store and cached here in
//! memory (every create and validate reads one, so a read is a map lookup). A tenant without a
//! policy of its own follows the default built from the configuration.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use crate::{
    error::Result,
    model::policy::{generated_cookie_name, Policy},
    store::{PolicyChange, PolicyOf, SessionStore},
};

/// Every tenant's policy, cached over the store.
pub struct Policies<S> {
    store: Arc<S>,
    default: Arc<Policy>,
    tenants: RwLock<BTreeMap<String, Arc<Policy>>>,
    /// The store's `policy_version` the map was loaded at: when it moves, another replica
    /// changed a policy, and the map is loaded again.
    loaded: std::sync::atomic::AtomicU64,
    /// Held from a policy's durable write until the map shows it, so that concurrent writes
    /// reach the map in the order they reached the store (memory and disk never disagree).
    writes: tokio::sync::Mutex<()>,
}

impl<S: SessionStore> Policies<S> {
    /// Loads every stored policy.
    pub fn load(store: Arc<S>, default: Policy) -> Result<Self> {
        let loaded = store.policy_version();
        let tenants = store
            .policies()?
            .into_iter()
            .map(|(t, p)| (t, Arc::new(p)))
            .collect();
        Ok(Self {
            store,
            default: Arc::new(default),
            tenants: RwLock::new(tenants),
            loaded: std::sync::atomic::AtomicU64::new(loaded),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Policy>>> {
        use std::sync::atomic::Ordering;
        let version = self.store.policy_version();
        if version != self.loaded.load(Ordering::Acquire) {
            // Another replica changed a policy: take the store's (already in memory) as they are.
            if let Ok(stored) = self.store.policies() {
                let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
                *tenants = stored.into_iter().map(|(t, p)| (t, Arc::new(p))).collect();
                self.loaded.store(version, Ordering::Release);
            }
        }
        // Entries are replaced whole, so a panic elsewhere cannot leave the map half-written.
        self.tenants.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy `tenant_id` follows, and whether it is the default.
    pub fn get(&self, tenant_id: &str) -> (Arc<Policy>, bool) {
        match self.read().get(tenant_id) {
            Some(p) => (p.clone(), false),
            None => (self.default.clone(), true),
        }
    }

    pub fn for_tenant(&self, tenant_id: &str) -> Arc<Policy> {
        self.get(tenant_id).0
    }

    /// Every tenant's policy as it is now, for a write that judges sessions of many tenants
    /// (the sweep). A copy, so the write never reads the store from inside its planner (on
    /// etcd, under the copy's lock).
    pub fn policy_of(&self) -> PolicyOf {
        let tenants = self.read().clone();
        let default = self.default.clone();
        Arc::new(move |tenant: &str| {
            tenants
                .get(tenant)
                .cloned()
                .unwrap_or_else(|| default.clone())
        })
    }

    /// Stores a tenant's policy (durably) and puts it in force.
    pub async fn set(&self, tenant_id: String, policy: Policy) -> Result<Arc<Policy>> {
        self.update(tenant_id, move |_| Ok(policy.clone())).await
    }

    /// Stores the policy `change` makes of the tenant's current one (its own or the default)
    /// and puts it in force. `change` runs inside the store's write, on the stored policy that
    /// write replaces (again if it is retried), so a partial update never undoes a change made
    /// meanwhile through another replica.
    pub async fn update(
        &self,
        tenant_id: String,
        change: impl Fn(&Policy) -> Result<Policy> + Send + Sync + 'static,
    ) -> Result<Arc<Policy>> {
        let default = self.default.clone();
        let change: PolicyChange = Arc::new(move |stored| {
            let policy = change(stored.unwrap_or(&default))?;
            policy.validate()?;
            Ok(Some(policy))
        });
        let _serial = self.writes.lock().await;
        let (_, stored) = self.store.put_policy(tenant_id.clone(), change).await?;
        let policy = Arc::new(stored.ok_or_else(|| {
            crate::error::Error::Storage("internal: a policy write stored nothing".into())
        })?);
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant_id, policy.clone());
        Ok(policy)
    }

    /// Deletes a tenant's policy; true if it had one.
    pub async fn delete(&self, tenant_id: &str) -> Result<bool> {
        let _serial = self.writes.lock().await;
        let (existed, _) = self
            .store
            .put_policy(tenant_id.to_string(), Arc::new(|_| Ok(None)))
            .await?;
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant_id);
        Ok(existed)
    }

    /// Tenants with a policy of their own, after `after`, at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Vec<(String, Arc<Policy>)> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.read()
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect()
    }

    /// The cookie name for a tenant: the policy's, or the tenant's generated one.
    pub fn cookie_name(&self, tenant_id: &str, policy: &Policy) -> String {
        policy
            .cookie_name
            .clone()
            .unwrap_or_else(|| generated_cookie_name(&self.store.installation_secret(), tenant_id))
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, path::PathBuf, sync::atomic::AtomicBool, time::Duration};

    use super::*;
    use crate::{
        clock::Timestamp,
        config::Config,
        events::EventBus,
        model::{
            audit::AuditEntry,
            event::Event,
            session::{Location, RevokeReason, Session},
            travel::{LastSeen, TravelRules},
        },
        store::{
            CreateOutcome, CreateRules, ListPage, ListScope, LogBounds, PolicyOf, RevokeOutcome,
            RevokeTarget, RotateOutcome, SledStore,
        },
        token::SessionId,
    };

    /// A sled store whose first policy write replies late, after it is durable: the window in
    /// which a second write can overtake it on its way to the in-memory map.
    struct SlowFirstPolicyWrite {
        inner: SledStore,
        first: AtomicBool,
    }

    impl SessionStore for SlowFirstPolicyWrite {
        fn get(&self, id: &SessionId) -> Result<Option<Session>> {
            self.inner.get(id)
        }
        fn list(&self, scope: &ListScope, cursor: Option<&[u8]>, limit: usize) -> Result<ListPage> {
            self.inner.list(scope, cursor, limit)
        }
        fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<SessionId>> {
            self.inner.due(now, limit)
        }
        fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
            self.inner.events_after(after, limit)
        }
        fn visit_events_since(
            &self,
            since: Timestamp,
            visit: &mut dyn FnMut(&Event),
        ) -> Result<()> {
            self.inner.visit_events_since(since, visit)
        }
        fn log_bounds(&self) -> Result<LogBounds> {
            self.inner.log_bounds()
        }
        fn size_on_disk(&self) -> Result<u64> {
            self.inner.size_on_disk()
        }
        fn events(&self) -> Arc<EventBus> {
            self.inner.events()
        }
        fn is_healthy(&self) -> bool {
            self.inner.is_healthy()
        }
        fn create(
            &self,
            session: Session,
            rules: CreateRules,
        ) -> impl Future<Output = Result<CreateOutcome>> + Send {
            self.inner.create(session, rules)
        }
        fn enforce(
            &self,
            ids: Vec<SessionId>,
            policy: Arc<Policy>,
            now: Timestamp,
        ) -> impl Future<Output = Result<usize>> + Send {
            self.inner.enforce(ids, policy, now)
        }
        fn observe(
            &self,
            id: SessionId,
            location: Location,
            now: Timestamp,
            rules: TravelRules,
        ) -> impl Future<Output = Result<Session>> + Send {
            self.inner.observe(id, location, now, rules)
        }
        fn last_seen(&self, tenant_id: &str, user_id: &str) -> Result<Option<LastSeen>> {
            self.inner.last_seen(tenant_id, user_id)
        }
        fn policies(&self) -> Result<Vec<(String, Policy)>> {
            self.inner.policies()
        }
        async fn put_policy(
            &self,
            tenant_id: String,
            change: PolicyChange,
        ) -> Result<(bool, Option<Policy>)> {
            let slow = self.first.swap(false, std::sync::atomic::Ordering::SeqCst);
            let put = self.inner.put_policy(tenant_id, change).await?;
            if slow {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(put)
        }
        fn pending_enforcements(&self) -> Result<Vec<String>> {
            self.inner.pending_enforcements()
        }
        fn enforcement_pending(&self, tenant_id: &str) -> Result<Option<u64>> {
            self.inner.enforcement_pending(tenant_id)
        }
        fn enforcement_done(
            &self,
            tenant_id: String,
            mark: u64,
        ) -> impl Future<Output = Result<()>> + Send {
            self.inner.enforcement_done(tenant_id, mark)
        }
        fn installation_secret(&self) -> [u8; 32] {
            self.inner.installation_secret()
        }
        fn log_epoch(&self) -> u64 {
            self.inner.log_epoch()
        }
        fn append_audit(&self, entry: AuditEntry) -> impl Future<Output = Result<u64>> + Send {
            self.inner.append_audit(entry)
        }
        fn snapshot(&self, path: PathBuf) -> impl Future<Output = Result<u64>> + Send {
            self.inner.snapshot(path)
        }
        fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
            self.inner.audit_after(after, limit)
        }
        fn rotate(
            &self,
            id: SessionId,
            rotation: crate::store::Rotation,
            policy: Arc<Policy>,
            now: Timestamp,
        ) -> impl Future<Output = Result<RotateOutcome>> + Send {
            self.inner.rotate(id, rotation, policy, now)
        }
        fn defend(
            &self,
            id: SessionId,
            defence: crate::store::Defence,
            policy: Arc<Policy>,
            now: Timestamp,
        ) -> impl Future<Output = Result<crate::store::Defended>> + Send {
            self.inner.defend(id, defence, policy, now)
        }
        fn revoke(
            &self,
            target: RevokeTarget,
            reason: RevokeReason,
            now: Timestamp,
        ) -> impl Future<Output = Result<RevokeOutcome>> + Send {
            self.inner.revoke(target, reason, now)
        }
        fn sweep(
            &self,
            ids: Vec<SessionId>,
            policy_of: PolicyOf,
            now: Timestamp,
        ) -> impl Future<Output = Result<usize>> + Send {
            self.inner.sweep(ids, policy_of, now)
        }
        fn prune_events(
            &self,
            older_than: Timestamp,
            keep: u64,
        ) -> impl Future<Output = Result<usize>> + Send {
            self.inner.prune_events(older_than, keep)
        }
        fn purge_user_state(
            &self,
            older_than: Timestamp,
            now: Timestamp,
            cursor: Option<Vec<u8>>,
            limit: usize,
        ) -> impl Future<Output = Result<crate::store::UserStatePage>> + Send {
            self.inner.purge_user_state(older_than, now, cursor, limit)
        }
        fn prune_audit(
            &self,
            older_than: Timestamp,
            keep: u64,
            limit: usize,
        ) -> impl Future<Output = Result<usize>> + Send {
            self.inner.prune_audit(older_than, keep, limit)
        }
        fn touch(&self, id: SessionId, now: Timestamp) {
            self.inner.touch(id, now)
        }
        fn end_soon(&self, id: SessionId, policy: Arc<Policy>, now: Timestamp) {
            self.inner.end_soon(id, policy, now)
        }
        fn close(&self) -> impl Future<Output = Result<()>> + Send {
            self.inner.close()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_reach_memory_in_the_order_they_reached_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SlowFirstPolicyWrite {
            inner: SledStore::open(
                &dir.path().join("data"),
                8 << 20,
                8 << 20,
                64,
                Duration::from_secs(60),
            )
            .expect("open"),
            first: AtomicBool::new(true),
        });
        let default = Policy::from(&Config::default());
        let policies = Arc::new(Policies::load(store.clone(), default.clone()).expect("load"));
        let with_limit = |n| Policy {
            max_sessions_per_user: n,
            ..default.clone()
        };
        // The first write is durable first but slow to reply; the second overtakes it.
        let first = {
            let (policies, p) = (policies.clone(), with_limit(1));
            tokio::spawn(async move { policies.set("t".into(), p).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        policies
            .set("t".into(), with_limit(2))
            .await
            .expect("second");
        first.await.expect("task").expect("first");
        let on_disk: Vec<_> = store.policies().expect("stored");
        assert_eq!(on_disk.len(), 1);
        assert_eq!(
            policies.for_tenant("t").max_sessions_per_user,
            on_disk[0].1.max_sessions_per_user,
            "memory and disk agree"
        );
    }
}
