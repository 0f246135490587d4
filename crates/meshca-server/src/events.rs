//! Events: issued, rotate, revoked, bundle-changed. Kept in a ring buffer
//! (the retention window) and broadcast to live subscribers, so a client that
//! reconnects with `Last-Event-ID` gets what it missed.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::broadcast;

/// How many events are kept for clients that reconnect.
pub const RETENTION: usize = 10_000;

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Monotonic id (the SSE `id:` field).
    pub id: u64,
    /// `issued`, `rotate`, `revoked`, `bundle-changed`.
    pub kind: &'static str,
    /// The identity concerned (none for bundle and rotate-all events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The identity concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The certificate concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
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

/// The event log.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        // Ids start from the clock so that they keep growing across restarts.
        let start =
            u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0) * 1000;
        Events {
            ring: Mutex::new((start, VecDeque::new())),
            tx: broadcast::channel(4096).0,
        }
    }
}

impl Events {
    /// Records and broadcasts an event.
    pub fn publish(
        &self,
        kind: &'static str,
        identity: Option<(&str, &str)>,
        serial: Option<String>,
    ) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.0 += 1;
        let event = Event {
            id: ring.0,
            kind,
            namespace: identity.map(|(ns, _)| ns.to_owned()),
            name: identity.map(|(_, n)| n.to_owned()),
            serial,
            at: meshca_pki::rfc3339(time::OffsetDateTime::now_utc()),
        };
        if ring.1.len() == RETENTION {
            ring.1.pop_front();
        }
        ring.1.push_back(event.clone());
        // Send under the lock so subscribers see ids in order with the backlog.
        let _ = self.tx.send(event);
    }

    /// The events after `last_id` still kept, and a receiver for new ones.
    pub fn subscribe(&self, last_id: Option<u64>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let backlog = match last_id {
            Some(id) => ring.1.iter().filter(|e| e.id > id).cloned().collect(),
            None => Vec::new(),
        };
        (backlog, rx)
    }
}
