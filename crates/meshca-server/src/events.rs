//! Events: issued, rotate, revoked, bundle-changed.
//!
//! An event is appended to the store's event log ([`Store::append_event`]);
//! every replica follows that log ([`Store::watch_events`]) into a local
//! ring buffer (the retention window for clients that reconnect with
//! `Last-Event-ID`) and a broadcast to live subscribers. With etcd the log is
//! shared, so an agent connected to any replica sees what happened on all of
//! them, in one order, with ids that mean the same everywhere.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use meshca_store::{Store, StoredEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many events each replica keeps for clients that reconnect.
pub const RETENTION: usize = 10_000;

/// One event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// The id (the SSE `id:` field); assigned by the store.
    #[serde(default, skip_deserializing)]
    pub id: u64,
    /// `issued`, `rotate`, `revoked`, `bundle-changed`.
    pub kind: String,
    /// The identity concerned (none for bundle and rotate-all events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The identity concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The certificate concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When, RFC 3339.
    pub at: String,
}

impl Event {
    /// Whether identity `ns/name` may see it: its own, and everyone's.
    pub fn visible_to(&self, ns: &str, name: &str) -> bool {
        match (&self.namespace, &self.name) {
            (Some(n), Some(m)) => n == ns && m == name,
            (None, None) => true,
            _ => false,
        }
    }
}

/// This replica's view of the event log.
#[derive(Debug)]
pub struct Events {
    store: Arc<dyn Store>,
    ring: Mutex<VecDeque<Event>>,
    tx: broadcast::Sender<Event>,
}

impl Events {
    /// An empty view; [`Events::follow`] fills it.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Events {
            store,
            ring: Mutex::new(VecDeque::new()),
            tx: broadcast::channel(4096).0,
        }
    }

    /// Appends an event to the store's log, in the background: the answer
    /// to the request that caused it does not wait for it. A failure is
    /// logged (the request itself succeeded and is recorded).
    pub fn publish(
        &self,
        kind: &'static str,
        identity: Option<(&str, &str)>,
        serial: Option<String>,
    ) {
        let event = Event {
            id: 0,
            kind: kind.to_owned(),
            namespace: identity.map(|(ns, _)| ns.to_owned()),
            name: identity.map(|(_, n)| n.to_owned()),
            serial,
            at: meshca_pki::rfc3339(time::OffsetDateTime::now_utc()),
        };
        let Ok(body) = serde_json::to_vec(&event) else {
            return;
        };
        if self.store.appends_events_in_memory() {
            // Nothing to wait for: a task of its own would cost more than
            // the append (one per issuance).
            if let Some(Err(e)) =
                futures_util::FutureExt::now_or_never(self.store.append_event(&body))
            {
                tracing::warn!("event {kind} not recorded: {e}");
            }
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            // A short outage of a shared store should not lose the event.
            for attempt in 0..5u32 {
                match store.append_event(&body).await {
                    Ok(_) => return,
                    Err(e) if attempt == 4 => {
                        tracing::warn!("event {kind} not recorded: {e}");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
                }
            }
        });
    }

    /// Adds an event read from the store's log to the ring and the broadcast.
    /// Decodes a stored event; `None` (with a warning) when it does not decode.
    fn decode(stored: &StoredEvent) -> Option<Event> {
        match serde_json::from_slice::<Event>(&stored.body) {
            Ok(mut event) => {
                event.id = stored.id;
                Some(event)
            }
            Err(e) => {
                tracing::warn!(
                    id = stored.id,
                    "skipping an event that does not decode: {e}"
                );
                None
            }
        }
    }

    fn push(&self, event: Event) -> Option<Event> {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.back().is_some_and(|last| last.id >= event.id) {
            return None;
        }
        if ring.len() == RETENTION {
            ring.pop_front();
        }
        ring.push_back(event.clone());
        // Sent under the lock so subscribers see ids in order with the backlog.
        let _ = self.tx.send(event.clone());
        Some(event)
    }

    /// Follows the store's event log for as long as the process runs,
    /// calling `on_event` for each new event (after it is in the ring).
    ///
    /// `before_bundle` runs to completion before a `bundle-changed` event
    /// reaches any subscriber: this replica reads the CA state again first,
    /// so an agent that fetches the bundle on the event gets the new one.
    pub async fn follow<F, Fut>(
        self: Arc<Self>,
        on_event: impl Fn(&Event) + Send + 'static,
        before_bundle: F,
    ) where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        loop {
            let after = {
                let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
                ring.back().map_or(0, |e| e.id)
            };
            match self.store.watch_events(after).await {
                Ok(mut feed) => {
                    while let Some(stored) = feed.next().await {
                        let Some(event) = Self::decode(&stored) else {
                            continue;
                        };
                        if event.kind == "bundle-changed" {
                            before_bundle().await;
                        }
                        if let Some(e) = self.push(event) {
                            on_event(&e);
                        }
                    }
                }
                Err(e) => tracing::warn!("cannot follow the event log (will retry): {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The id of the last event this replica has taken from the store's
    /// log (0 before the first). Ids grow, so every event appended after
    /// this call has a greater id: a stream opened with it as
    /// `Last-Event-ID` ([`Events::subscribe`]) misses none of them (and
    /// may get a few from just before, still on their way to the ring).
    pub fn last_id(&self) -> u64 {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.back().map_or(0, |e| e.id)
    }

    /// The events after `last_id` still kept, and a receiver for new ones.
    pub fn subscribe(&self, last_id: Option<u64>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let backlog = match last_id {
            Some(id) => ring.iter().filter(|e| e.id > id).cloned().collect(),
            None => Vec::new(),
        };
        (backlog, rx)
    }
}
