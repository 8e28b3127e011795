//! `PolicyService`: decode and validate, call the policy registry, encode.

use std::sync::Arc;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use tonic::{Request, Response, Status};

use super::{
    convert::{id_field, merge_policy_fields, policy_from_proto, policy_to_proto},
    sessions::check_tenant,
};
use crate::{
    error::Error,
    proto::v1::{self as pb, policy_service_server::PolicyService},
    security::layer::caller,
    sessions::{limits, Sessions},
    store::SessionStore,
};

/// The gRPC face of tenant policies.
pub struct PolicyApi<S> {
    sessions: Arc<Sessions<S>>,
}

impl<S> PolicyApi<S> {
    pub fn new(sessions: Arc<Sessions<S>>) -> Self {
        Self { sessions }
    }
}

/// Open sessions follow a tightened policy at once on every read; storing it on them (and ending
/// those already past it, with their events, so caches hear of it) runs in the background.
pub(super) fn spawn_enforcement<S: SessionStore>(sessions: Arc<Sessions<S>>, tenant: String) {
    tokio::spawn(async move {
        match sessions.enforce_policy(&tenant).await {
            Ok(changed) => {
                tracing::info!(tenant_id = %tenant, changed, "policy applied to open sessions")
            }
            Err(e) => {
                tracing::warn!(tenant_id = %tenant, error = %e, "applying a policy to open sessions failed; reads still apply it")
            }
        }
    });
}

#[tonic::async_trait]
impl<S: SessionStore> PolicyService for PolicyApi<S> {
    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let caller = caller(&request)?;
        let tenant_id = id_field("tenant_id", request.into_inner().tenant_id)?;
        check_tenant(&caller, &tenant_id)?;
        let policies = self.sessions.policies();
        let (policy, is_default) = policies.get(&tenant_id);
        let cookie_name = policies.cookie_name(&tenant_id, &policy);
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(policy_to_proto(&tenant_id, &policy, cookie_name)),
            is_default,
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let given = r
            .policy
            .ok_or_else(|| Error::invalid("policy", "is required"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let policies = self.sessions.policies();
        let (tenant_id, stored) = if paths.is_empty() {
            let (tenant_id, policy) = policy_from_proto(given)?;
            check_tenant(&caller, &tenant_id)?;
            let stored = policies.set(tenant_id.clone(), policy).await?;
            (tenant_id, stored)
        } else {
            let tenant_id = id_field("policy.tenant_id", given.tenant_id.clone())?;
            check_tenant(&caller, &tenant_id)?;
            let tenant = tenant_id.clone();
            let stored = policies
                .update(tenant_id.clone(), move |current| {
                    // The tenant's own cookie name, or none (the generated one is not stored).
                    let own_cookie = current.cookie_name.clone().unwrap_or_default();
                    let mut merged = policy_to_proto(&tenant, current, own_cookie);
                    merge_policy_fields(&mut merged, given.clone(), &paths)?;
                    Ok(policy_from_proto(merged)?.1)
                })
                .await?;
            (tenant_id, stored)
        };
        tracing::info!(tenant_id = %tenant_id, "policy set");
        // In force from here, whatever happens to the audit write below.
        spawn_enforcement(self.sessions.clone(), tenant_id.clone());
        let detail = serde_json::to_string(&*stored).unwrap_or_default();
        self.sessions
            .audit(
                &caller.name,
                caller.role_name(),
                "SetPolicy",
                Some(&tenant_id),
                detail,
            )
            .await?;
        let cookie_name = policies.cookie_name(&tenant_id, &stored);
        Ok(Response::new(pb::SetPolicyResponse {
            policy: Some(policy_to_proto(&tenant_id, &stored, cookie_name)),
        }))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let page_size = match r.page_size as usize {
            0 => limits::DEFAULT_PAGE_SIZE,
            n if n > limits::MAX_PAGE_SIZE => {
                return Err(Error::invalid("page_size", "must be at most 1000").into())
            }
            n => n,
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            let bytes = URL_SAFE_NO_PAD
                .decode(r.page_token.as_bytes())
                .map_err(|_| Error::invalid("page_token", "is not a token from this service"))?;
            Some(
                String::from_utf8(bytes).map_err(|_| {
                    Error::invalid("page_token", "is not a token from this service")
                })?,
            )
        };
        let policies = self.sessions.policies();
        let mut page = match &caller.tenant {
            // A tenant-bound admin sees its own policy only.
            Some(tenant) => policies
                .list(None, usize::MAX)
                .into_iter()
                .filter(|(t, _)| t == tenant && after.as_deref().is_none_or(|a| t.as_str() > a))
                .collect(),
            None => policies.list(after.as_deref(), page_size + 1),
        };
        let next_page_token = if page.len() > page_size {
            page.truncate(page_size);
            page.last()
                .map(|(t, _)| URL_SAFE_NO_PAD.encode(t))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: page
                .iter()
                .map(|(t, p)| policy_to_proto(t, p, policies.cookie_name(t, p)))
                .collect(),
            next_page_token,
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let caller = caller(&request)?;
        let tenant_id = id_field("tenant_id", request.into_inner().tenant_id)?;
        check_tenant(&caller, &tenant_id)?;
        let deleted = self.sessions.policies().delete(&tenant_id).await?;
        if deleted {
            // The default may be stricter than the policy it replaces.
            spawn_enforcement(self.sessions.clone(), tenant_id.clone());
        }
        self.sessions
            .audit(
                &caller.name,
                caller.role_name(),
                "DeletePolicy",
                Some(&tenant_id),
                format!("deleted={deleted}"),
            )
            .await?;
        if deleted {
            tracing::info!(tenant_id = %tenant_id, "policy deleted");
        }
        Ok(Response::new(pb::DeletePolicyResponse { deleted }))
    }
}
