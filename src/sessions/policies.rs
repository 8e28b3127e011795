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
    store::SessionStore,
};

/// Every tenant's policy, cached over the store.
pub struct Policies<S> {
    store: Arc<S>,
    default: Arc<Policy>,
    tenants: RwLock<BTreeMap<String, Arc<Policy>>>,
    /// Held from a policy's durable write until the map shows it, so that concurrent writes
    /// reach the map in the order they reached the store (memory and disk never disagree).
    writes: tokio::sync::Mutex<()>,
}

impl<S: SessionStore> Policies<S> {
    /// Loads every stored policy.
    pub fn load(store: Arc<S>, default: Policy) -> Result<Self> {
        let tenants = store
            .policies()?
            .into_iter()
            .map(|(t, p)| (t, Arc::new(p)))
            .collect();
        Ok(Self {
            store,
            default: Arc::new(default),
            tenants: RwLock::new(tenants),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Policy>>> {
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

    /// Stores a tenant's policy (durably) and puts it in force.
    pub async fn set(&self, tenant_id: String, policy: Policy) -> Result<Arc<Policy>> {
        self.update(tenant_id, |_| Ok(policy)).await
    }

    /// Stores the policy `change` makes of the tenant's current one (its own or the default),
    /// with no other policy write in between, and puts it in force.
    pub async fn update(
        &self,
        tenant_id: String,
        change: impl FnOnce(&Policy) -> Result<Policy>,
    ) -> Result<Arc<Policy>> {
        let _serial = self.writes.lock().await;
        let policy = change(&self.for_tenant(&tenant_id))?;
        policy.validate()?;
        self.store
            .put_policy(tenant_id.clone(), Some(policy.clone()))
            .await?;
        let policy = Arc::new(policy);
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant_id, policy.clone());
        Ok(policy)
    }

    /// Deletes a tenant's policy; true if it had one.
    pub async fn delete(&self, tenant_id: &str) -> Result<bool> {
        let _serial = self.writes.lock().await;
        let existed = self.store.put_policy(tenant_id.to_string(), None).await?;
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
