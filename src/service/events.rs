//! `EventService`: decode the filter and cursor, start a subscription, encode what it yields.

use std::{pin::Pin, sync::Arc};

use futures_core::Stream;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{event_to_proto, timestamp, watch_filter};
use crate::{
    events::subscription::{self, WatchItem, WatchSettings},
    proto::v1::{self as pb, event_service_server::EventService},
    store::SessionStore,
};

/// The stream type of `WatchEvents`.
pub type WatchEventsStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send + 'static>>;

/// The gRPC face of the event log.
pub struct EventApi<S> {
    store: Arc<S>,
    settings: WatchSettings,
}

impl<S> EventApi<S> {
    pub fn new(store: Arc<S>, settings: WatchSettings) -> Self {
        Self { store, settings }
    }
}

fn encode(item: WatchItem) -> pb::WatchEventsResponse {
    let message = match item {
        WatchItem::Event(event) => {
            pb::watch_events_response::Message::Event(event_to_proto(&event))
        }
        WatchItem::Heartbeat {
            head,
            delivered_through,
            sent_at,
        } => pb::watch_events_response::Message::Heartbeat(pb::Heartbeat {
            head_sequence: head,
            delivered_through,
            sent_at: Some(timestamp(sent_at)),
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
        let r = request.into_inner();
        let filter = watch_filter(r.filter.unwrap_or_default())?;
        let items = subscription::watch(
            self.store.clone(),
            r.after_sequence,
            filter,
            self.settings.clone(),
        )?;
        let stream = ReceiverStream::new(items).map(|item| item.map(encode).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
}
