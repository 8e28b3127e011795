//! One subscriber's event stream: replay from the durable log, then live, with no gap and no
//! duplicate, whatever the subscriber's speed.
//!
//! The loop keeps a `cursor`: the sequence up to which every event has been considered (sent if
//! it matched the filter). Two sources feed it:
//!
//! - the **log** (`SessionStore::events_after`), read whenever the cursor is behind the durable
//!   head: at the start of a resume, and after falling behind the live fan-out;
//! - the **live** broadcast, which it subscribes to *before* reading the head, so that anything
//!   published after the replay is in the broadcast.
//!
//! Anything at or below the cursor is a duplicate and skipped; anything beyond `cursor + 1` means
//! a hole, filled from the log (which has it: events are published only once durable). A
//! subscriber too slow for the bounded broadcast gets `Lagged`, and simply reads from the log
//! again. So nobody is dropped, writers never wait for a subscriber, and memory per subscriber is
//! bounded by the small channel to its connection.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::sync::{broadcast, mpsc, watch};

use crate::{
    clock::{Clock, Timestamp},
    error::{Error, Result},
    events::{Event, EventType},
    store::{self, SessionStore},
};

/// Events read from the log per store call while catching up.
const REPLAY_BATCH: usize = 512;
/// Items buffered between a subscriber's loop and its connection. Small: a stalled connection
/// should stall only its own loop, which then catches up from the log.
const STREAM_BUFFER: usize = 64;

/// Which events a subscriber wants. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    pub types: HashSet<EventType>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        self.tenant_id.as_ref().is_none_or(|t| *t == e.tenant_id)
            && self.user_id.as_ref().is_none_or(|u| *u == e.user_id)
            && (self.types.is_empty() || self.types.contains(&e.kind.event_type()))
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Event(Arc<Event>),
    Heartbeat {
        head: u64,
        delivered_through: u64,
        sent_at: Timestamp,
    },
}

/// How a stream behaves.
#[derive(Clone)]
pub struct WatchSettings {
    pub heartbeat: Duration,
    pub clock: Arc<dyn Clock>,
    /// Turns true when the server shuts down; streams then end with `ShuttingDown`.
    pub shutdown: watch::Receiver<bool>,
}

/// Where a subscription starts: the live head, or after a sequence of a log epoch.
#[derive(Debug, Clone, Copy)]
pub struct Cursor {
    pub after: Option<u64>,
    /// The epoch `after` came from, if the subscriber knows it.
    pub log_epoch: Option<u64>,
}

/// Starts a subscription. Fails at once (before any item) if `after` is outside the log or from
/// another epoch of it.
pub fn watch<S: SessionStore>(
    store: Arc<S>,
    cursor: Cursor,
    filter: Filter,
    announce_live: bool,
    settings: WatchSettings,
) -> Result<mpsc::Receiver<Result<WatchItem>>> {
    if let Some(given) = cursor.log_epoch.filter(|e| *e != store.log_epoch()) {
        return Err(Error::LogEpochChanged {
            given,
            current: store.log_epoch(),
        });
    }
    let after = cursor.after;
    let bus = store.events();
    // Subscribe before reading the head: every event past the head is then in `live`.
    let live = bus.subscribe();
    let cursor = match after {
        None => bus.durable_head(),
        Some(after) => {
            check_cursor(&*store, after)?;
            after
        }
    };
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let stream = Stream {
        store,
        filter: Arc::new(filter),
        settings,
        tx,
        cursor,
        announce_live,
        last_sent: tokio::time::Instant::now(),
    };
    tokio::spawn(stream.run(live));
    Ok(rx)
}

/// OUT_OF_RANGE unless the log still holds every event after `after`.
fn check_cursor<S: SessionStore>(store: &S, after: u64) -> Result<()> {
    let bounds = store.log_bounds()?;
    if after > bounds.head || after.saturating_add(1) < bounds.first {
        return Err(Error::CursorOutOfRange {
            after,
            oldest: bounds.first,
            head: bounds.head,
        });
    }
    Ok(())
}

/// A page of the log read for a replay: its bounds, and the events the filter lets through.
struct ReplayPage {
    first: Option<u64>,
    last: u64,
    matching: Vec<Event>,
}

struct Stream<S> {
    store: Arc<S>,
    filter: Arc<Filter>,
    settings: WatchSettings,
    tx: mpsc::Sender<Result<WatchItem>>,
    cursor: u64,
    /// Whether to send a heartbeat once the first catch-up reaches the head.
    announce_live: bool,
    /// When the subscriber last got anything; a heartbeat follows after an interval of silence,
    /// even while filtered-out events flow.
    last_sent: tokio::time::Instant,
}

/// Why a stream stopped.
enum Stop {
    /// The subscriber went away; nothing more to say.
    Gone,
    /// End the stream with this error.
    Fail(Error),
}

impl<S: SessionStore> Stream<S> {
    async fn run(mut self, live: broadcast::Receiver<Arc<Event>>) {
        if let Stop::Fail(e) = self.serve(live).await {
            let _ = self.tx.send(Err(e)).await;
        }
    }

    async fn serve(&mut self, mut live: broadcast::Receiver<Arc<Event>>) -> Stop {
        let mut shutdown = self.settings.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return Stop::Fail(self.shutting_down());
            }
            if let Err(stop) = self.catch_up().await {
                return stop;
            }
            if std::mem::take(&mut self.announce_live) {
                if let Err(stop) = self.heartbeat().await {
                    return stop;
                }
            }
            let idle = tokio::time::sleep_until(self.last_sent + self.settings.heartbeat);
            tokio::pin!(idle);
            let step = tokio::select! {
                received = live.recv() => match received {
                    Ok(event) => self.offer(event).await,
                    // Fell behind the fan-out: the next round's catch-up reads the log.
                    Err(broadcast::error::RecvError::Lagged(_)) => Ok(()),
                    Err(broadcast::error::RecvError::Closed) => Err(Stop::Fail(Error::ShuttingDown)),
                },
                _ = &mut idle => self.heartbeat().await,
                _ = shutdown.changed() => Err(Stop::Fail(self.shutting_down())),
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    fn shutting_down(&self) -> Error {
        Error::StreamEnded(format!(
            "server shutting down; resume with after_sequence={}",
            self.cursor
        ))
    }

    /// Reads the log until the cursor reaches the durable head, a page at a time on a blocking
    /// thread (see [`store::scan`]): a filter that matches nothing in a long log must not hold an
    /// async worker, however many subscribers replay at once.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let head = self.store.events().durable_head();
            if self.cursor >= head {
                return Ok(());
            }
            let (store, filter, after) = (self.store.clone(), self.filter.clone(), self.cursor);
            let page = store::scan(move || {
                let batch = store.events_after(after, REPLAY_BATCH)?;
                Ok(ReplayPage {
                    first: batch.first().map(|e| e.sequence),
                    last: batch.last().map_or(after, |e| e.sequence),
                    matching: batch.into_iter().filter(|e| filter.matches(e)).collect(),
                })
            })
            .await
            .map_err(Stop::Fail)?;
            if page.first != Some(self.cursor + 1) {
                // Retention pruned what this subscriber had not read yet.
                return Err(Stop::Fail(self.lost_events()));
            }
            for event in page.matching {
                let sequence = event.sequence;
                self.send(WatchItem::Event(Arc::new(event))).await?;
                self.cursor = sequence;
            }
            // Past the filtered-out events of the page too.
            self.cursor = page.last;
        }
    }

    fn lost_events(&self) -> Error {
        match self.store.log_bounds() {
            Ok(bounds) => Error::CursorOutOfRange {
                after: self.cursor,
                oldest: bounds.first,
                head: bounds.head,
            },
            Err(e) => e,
        }
    }

    /// An event from the live fan-out: deliver it if it is next, skip it if already delivered,
    /// and read the log if it reveals a hole.
    async fn offer(&mut self, event: Arc<Event>) -> Result<(), Stop> {
        if event.sequence <= self.cursor {
            Ok(())
        } else if event.sequence == self.cursor + 1 {
            self.deliver(event).await
        } else {
            self.catch_up().await
        }
    }

    /// Sends `event` if it matches the filter, and moves the cursor past it.
    async fn deliver(&mut self, event: Arc<Event>) -> Result<(), Stop> {
        let sequence = event.sequence;
        if self.filter.matches(&event) {
            self.send(WatchItem::Event(event)).await?;
        }
        self.cursor = sequence;
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), Stop> {
        let item = WatchItem::Heartbeat {
            head: self.store.events().durable_head(),
            delivered_through: self.cursor,
            sent_at: self.settings.clock.now(),
        };
        self.send(item).await
    }

    /// Waits for room on the connection, but not past a shutdown: a stalled subscriber must not
    /// hold the server open.
    async fn send(&mut self, item: WatchItem) -> Result<(), Stop> {
        let mut shutdown = self.settings.shutdown.clone();
        if *shutdown.borrow() {
            return Err(Stop::Fail(self.shutting_down()));
        }
        tokio::select! {
            sent = self.tx.send(Ok(item)) => sent.map_err(|_| Stop::Gone)?,
            _ = shutdown.changed() => return Err(Stop::Fail(self.shutting_down())),
        }
        self.last_sent = tokio::time::Instant::now();
        Ok(())
    }
}
