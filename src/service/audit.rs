//! `AuditService`: the audit trail, for admins.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{id_field, timestamp};
use crate::{
    error::Error,
    proto::v1::{self as pb, audit_service_server::AuditService},
    security::layer::caller,
    sessions::limits,
    store::SessionStore,
};

/// The gRPC face of the audit trail.
pub struct AuditApi<S> {
    store: Arc<S>,
}

impl<S> AuditApi<S> {
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }
}

/// Audit chunks (of 1024 records) read per call at most.
const MAX_CHUNKS: usize = 16;

#[tonic::async_trait]
impl<S: SessionStore> AuditService for AuditApi<S> {
    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let mut tenant = if r.tenant_id.is_empty() {
            None
        } else {
            Some(id_field("tenant_id", r.tenant_id)?)
        };
        if let Some(bound) = &caller.tenant {
            if tenant.as_ref().is_some_and(|t| t != bound) {
                return Err(Status::permission_denied(format!(
                    "tenant_id: {caller} is bound to another tenant"
                )));
            }
            tenant = Some(bound.clone());
        }
        let page_size = match r.page_size as usize {
            0 => limits::DEFAULT_PAGE_SIZE,
            n if n > limits::MAX_PAGE_SIZE => {
                return Err(Error::invalid("page_size", "must be at most 1000").into())
            }
            n => n,
        };
        let mut after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| Error::invalid("page_token", "is not a token from this service"))?
        };
        // Filtering by tenant may skip many entries; read in chunks until the page is full, but
        // no more than `MAX_CHUNKS` per call: a page may then come back short (even empty) with
        // a token to go on from, so one call's work stays bounded however sparse the tenant.
        let mut records = Vec::new();
        let (mut full, mut exhausted) = (false, false);
        for _ in 0..MAX_CHUNKS {
            let store = self.store.clone();
            let chunk = crate::store::scan(move || store.audit_after(after, 1024)).await?;
            exhausted = chunk.len() < 1024;
            for e in chunk {
                if records.len() == page_size {
                    full = true;
                    break;
                }
                after = e.id;
                if tenant.is_some() && e.tenant_id != tenant {
                    continue;
                }
                records.push(pb::AuditRecord {
                    id: e.id,
                    at: Some(timestamp(e.at)),
                    caller: e.caller,
                    role: e.role,
                    action: e.action,
                    tenant_id: e.tenant_id.unwrap_or_default(),
                    detail: e.detail,
                });
            }
            if full || exhausted {
                break;
            }
        }
        // Full: go on after the last record sent. Out of chunk budget: after the last one read.
        let next_page_token = if full || !exhausted {
            after.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records,
            next_page_token,
        }))
    }
}
