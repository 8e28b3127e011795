//! `EventService`: decode the filter and cursor, start a subscription, encode what it yields.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
};

use futures_core::Stream;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{event_to_proto, timestamp, watch_filter};
use crate::{
    proto::v1::{self as pb, event_service_server::EventService},
    security::layer::caller,
    sessions::subscription::{self, WatchItem, WatchSettings},
    store::SessionStore,
};

/// The stream type of `WatchEvents`.
pub type WatchEventsStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send + 'static>>;

/// The gRPC face of the event log.
pub struct EventApi<S> {
    store: Arc<S>,
    settings: WatchSettings,
    max_per_caller: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl<S> EventApi<S> {
    pub fn new(store: Arc<S>, settings: WatchSettings, max_per_caller: usize) -> Self {
        Self {
            store,
            settings,
            max_per_caller,
            open: Arc::default(),
        }
    }
}

/// Counts one open stream of a caller; releases it when the stream is dropped.
struct StreamSlot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl StreamSlot {
    fn take(open: &Arc<Mutex<HashMap<String, usize>>>, caller: &str, max: usize) -> Option<Self> {
        let mut counts = open.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(caller.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        crate::metrics::subscribers(1.0);
        Some(Self {
            open: open.clone(),
            caller: caller.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        crate::metrics::subscribers(-1.0);
        let mut counts = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

fn encode(item: WatchItem, log_epoch: u64) -> pb::WatchEventsResponse {
    let message = match item {
        WatchItem::Event(event) => {
            pb::watch_events_response::Message::Event(event_to_proto(&event, log_epoch))
        }
        WatchItem::Heartbeat {
            head,
            delivered_through,
            sent_at,
        } => pb::watch_events_response::Message::Heartbeat(pb::Heartbeat {
            head_sequence: head,
            delivered_through,
            sent_at: Some(timestamp(sent_at)),
            log_epoch,
        }),
    };
    pb::WatchEventsResponse {
        message: Some(message),
    }
}

#[tonic::async_trait]
impl<S: SessionStore> EventService for EventApi<S> {
    type WatchEventsStream = WatchEventsStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let mut filter = watch_filter(r.filter.unwrap_or_default())?;
        if let Some(tenant) = &caller.tenant {
            // A tenant-bound caller sees its own tenant's events only.
            match &filter.tenant_id {
                Some(t) if t != tenant => {
                    return Err(Status::permission_denied(format!(
                        "filter.tenant_id: {caller} is bound to another tenant"
                    )))
                }
                _ => filter.tenant_id = Some(tenant.clone()),
            }
        }
        let slot =
            StreamSlot::take(&self.open, &caller.name, self.max_per_caller).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "{caller} already has {} event streams open",
                    self.max_per_caller
                ))
            })?;
        let cursor = subscription::Cursor {
            after: r.after_sequence,
            log_epoch: r.log_epoch,
        };
        let items = subscription::watch(
            self.store.clone(),
            cursor,
            filter,
            r.announce_live,
            self.settings.clone(),
        )?;
        let log_epoch = self.store.log_epoch();
        let stream = ReceiverStream::new(items).map(move |item| {
            // The slot lives as long as the stream.
            let _slot = &slot;
            item.map(|i| encode(i, log_epoch)).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
