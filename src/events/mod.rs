//! The session event log's live side: fan-out of durable events to subscribers.
//!
//! The store writes each event in the same atomic batch as the change it records and hands it to
//! [`EventBus::publish`] only after the flush that made it durable. So a subscriber never sees an
//! event that a crash could take back, and the live stream and the durable log agree on order.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

pub use crate::model::event::{Event, EventKind, EventType};

/// Fan-out of events that are durable, and the sequence number of the newest of them.
pub struct EventBus {
    live: broadcast::Sender<Arc<Event>>,
    durable_head: watch::Sender<u64>,
}

impl EventBus {
    /// `capacity` bounds memory: a subscriber more than `capacity` events behind is told it lagged
    /// and catches up from the durable log.
    pub fn new(capacity: usize, durable_head: u64) -> Self {
        let (live, _) = broadcast::channel(capacity.max(1));
        let (durable_head, _) = watch::channel(durable_head);
        Self { live, durable_head }
    }

    /// Called by the store after a flush, in sequence order, with `head` the newest durable
    /// sequence (which may be ahead of the last event when an empty batch was flushed).
    pub fn publish(&self, events: Vec<Event>, head: u64) {
        // Raise the head first: a subscriber that sees an event may rely on reading it from the
        // log, and replay reads only up to the durable head.
        self.durable_head.send_if_modified(|h| {
            let raised = head > *h;
            *h = (*h).max(head);
            raised
        });
        crate::metrics::event_head(head);
        for event in events {
            let reason = match &event.kind {
                EventKind::Revoked { reason } => Some(format!("{reason:?}")),
                _ => None,
            };
            crate::metrics::event(event.kind.event_type().name(), reason);
            // An error only means nobody is subscribed right now; the log still has the event.
            let _ = self.live.send(Arc::new(event));
        }
    }

    /// The newest sequence that is durable.
    pub fn durable_head(&self) -> u64 {
        *self.durable_head.borrow()
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }
}
