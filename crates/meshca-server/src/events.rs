//! Events: issued, rotate, revoked, bundle-changed; and `reset`, which
//! tells a subscriber that it missed some.
//!
//! An event is appended to the store's event log ([`Store::append_event`]);
//! every replica follows that log ([`Store::watch_events`]) into local rings
//! (the retention window for clients that reconnect with `Last-Event-ID`)
//! and a broadcast to live subscribers. With etcd the log is shared, so an
//! agent connected to any replica sees what happened on all of them, in one
//! order, with ids that mean the same everywhere.
//!
//! # Retention
//! One ring per identity (`events_per_identity`) and one for events that
//! concern no single identity (`events_shared`): an identity that renews in
//! a loop pushes out its own old events, never another identity's pending
//! `rotate`. Each ring remembers the newest id it dropped; a subscriber
//! resuming from an id below that, in a ring it can see, missed events and
//! is sent a [`RESET`] event first (reason `ring`); a live subscriber that
//! falls behind the broadcast gets one too (reason `lagged`). A client takes
//! `reset` as "what you know may be stale": fetch the bundle and your
//! certificate again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use meshca_store::{Store, StoredEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// The kind of the event that says events were missed.
pub const RESET: &str = "reset";

/// Why a subscriber is sent [`RESET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// It resumed from an id older than a ring it sees still keeps.
    Ring,
    /// It fell behind the live broadcast.
    Lagged,
}

impl Missed {
    /// As the event's `reason` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Ring => "ring",
            Missed::Lagged => "lagged",
        }
    }
}

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
    /// Why a [`RESET`] was sent (`ring`, `lagged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    /// A [`RESET`] with id `id` (the newest id the subscriber is now level
    /// with: what it fetches again is at least that fresh).
    pub fn reset(id: u64, why: Missed) -> Event {
        Event {
            id,
            kind: RESET.to_owned(),
            namespace: None,
            name: None,
            serial: None,
            at: meshca_pki::rfc3339(time::OffsetDateTime::now_utc()),
            reason: Some(why.as_str().to_owned()),
        }
    }

    /// The identity it concerns, if one.
    fn identity(&self) -> Option<(&str, &str)> {
        match (&self.namespace, &self.name) {
            (Some(n), Some(m)) => Some((n, m)),
            _ => None,
        }
    }

    /// Whether identity `ns/name` may see it: its own, and everyone's.
    pub fn visible_to(&self, ns: &str, name: &str) -> bool {
        match (&self.namespace, &self.name) {
            (Some(n), Some(m)) => n == ns && m == name,
            (None, None) => true,
            _ => false,
        }
    }
}

/// One retention ring, and the newest id it has dropped.
#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Event>,
    dropped: u64,
}

impl Ring {
    /// Adds `event`; returns the ids it dropped to stay within `cap`.
    fn push(&mut self, event: Event, cap: usize) -> Vec<u64> {
        let mut gone = Vec::new();
        while self.events.len() >= cap.max(1) {
            match self.pop_oldest() {
                Some(id) => gone.push(id),
                None => break,
            }
        }
        self.events.push_back(event);
        gone
    }

    fn pop_oldest(&mut self) -> Option<u64> {
        let old = self.events.pop_front()?;
        self.dropped = old.id;
        Some(old.id)
    }

    /// Whether a subscriber level with `last` missed some of this ring.
    fn missed_after(&self, last: u64) -> bool {
        self.dropped > last
    }

    fn after(&self, last: u64) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |e| e.id > last)
    }
}

/// Events kept at most, all rings together: each ring is bounded, and so
/// is their sum (many identities at their bound: the oldest event of all
/// goes first). About 40 MB at most.
pub const MAX_EVENTS: usize = 100_000;

/// The rings: shared, and per identity.
#[derive(Debug, Default)]
struct Rings {
    shared: Ring,
    by_identity: HashMap<(String, String), Ring>,
    /// Every kept event's id and its ring (none: shared), oldest first.
    kept: std::collections::BTreeMap<u64, Option<(String, String)>>,
    /// The newest id taken from the store's log.
    last: u64,
    /// Ids up to this may be of events this replica never had (the store
    /// lost them: an embedded store's earlier process).
    floor: u64,
}

impl Rings {
    /// For a subscriber level with `last` that sees everything (`identity`
    /// none) or one identity's events and the shared ones: a [`RESET`] if
    /// events it could see were dropped, and those kept after `last`.
    fn after(&self, last: u64, identity: Option<(&str, &str)>) -> (Option<Event>, Vec<Event>) {
        let seen: Vec<&Ring> = match identity {
            Some((ns, name)) => std::iter::once(&self.shared)
                .chain(self.by_identity.get(&(ns.to_owned(), name.to_owned())))
                .collect(),
            None => std::iter::once(&self.shared)
                .chain(self.by_identity.values())
                .collect(),
        };
        // Ids below the floor are of events this replica never had: what
        // came between them and the floor cannot be known, so it is said.
        // (Id 0 is a client that never saw one: it has nothing stale.)
        let missed = seen.iter().any(|r| r.missed_after(last)) || (last > 0 && last < self.floor);
        let mut backlog: Vec<Event> = seen
            .iter()
            .flat_map(|r| r.after(last))
            .filter(|e| identity.is_none_or(|(ns, n)| e.visible_to(ns, n)))
            .cloned()
            .collect();
        backlog.sort_by_key(|e| e.id);
        // Level with every event of the rings it sees once it has fetched
        // again (the backlog that follows is no newer).
        (
            missed.then(|| Event::reset(self.last, Missed::Ring)),
            backlog,
        )
    }

    fn ring_mut(&mut self, key: &Option<(String, String)>) -> &mut Ring {
        match key {
            Some(k) => self.by_identity.entry(k.clone()).or_default(),
            None => &mut self.shared,
        }
    }

    /// Keeps `event` in its ring within `cap`, and all of them within
    /// [`MAX_EVENTS`].
    fn keep(&mut self, event: Event, cap: usize) {
        let key = event
            .identity()
            .map(|(ns, name)| (ns.to_owned(), name.to_owned()));
        let id = event.id;
        for gone in self.ring_mut(&key).push(event, cap) {
            self.kept.remove(&gone);
        }
        self.kept.insert(id, key);
        while self.kept.len() > MAX_EVENTS {
            let Some((_, key)) = self.kept.pop_first() else {
                break;
            };
            // Rings are in id order: the oldest of all is its ring's first.
            self.ring_mut(&key).pop_oldest();
        }
    }
}

/// This replica's view of the event log.
#[derive(Debug)]
pub struct Events {
    store: Arc<dyn Store>,
    rings: Mutex<Rings>,
    tx: broadcast::Sender<Event>,
    per_identity: usize,
    shared: usize,
}

/// What a subscriber gets: a [`RESET`] if it missed some, the events still
/// kept after its id, and a receiver for new ones.
#[derive(Debug)]
pub struct Subscription {
    /// Set when events it could see were dropped since its id.
    pub reset: Option<Event>,
    /// The kept events after its id that it may see, in id order.
    pub backlog: Vec<Event>,
    /// New events (all of them: the caller filters).
    pub live: broadcast::Receiver<Event>,
}

impl Events {
    /// An empty view with the default retention; [`Events::follow`] fills it.
    pub fn new(store: Arc<dyn Store>) -> Self {
        let d = crate::limits::Limits::default();
        Self::with_retention(store, d.events_per_identity, d.events_shared)
    }

    /// An empty view keeping `per_identity` events per identity and `shared`
    /// of the others.
    pub fn with_retention(store: Arc<dyn Store>, per_identity: usize, shared: usize) -> Self {
        let floor = store.event_floor();
        Events {
            store,
            rings: Mutex::new(Rings {
                floor,
                ..Rings::default()
            }),
            tx: broadcast::channel(4096).0,
            per_identity,
            shared,
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
            reason: None,
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
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        if rings.last >= event.id {
            return None;
        }
        rings.last = event.id;
        let cap = if event.identity().is_some() {
            self.per_identity
        } else {
            self.shared
        };
        rings.keep(event.clone(), cap);
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
            let after = self.last_id();
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
        let rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        // Never below the floor: a client resuming from it missed nothing.
        rings.last.max(rings.floor)
    }

    /// What a subscriber resuming from `last_id` gets (none: only new
    /// events), seeing everything (`identity` none: the admin) or one
    /// identity's events and the shared ones.
    pub fn subscribe(&self, last_id: Option<u64>, identity: Option<(&str, &str)>) -> Subscription {
        let rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.tx.subscribe();
        let Some(last) = last_id else {
            return Subscription {
                reset: None,
                backlog: Vec::new(),
                live,
            };
        };
        let (reset, backlog) = rings.after(last, identity);
        Subscription {
            reset,
            backlog,
            live,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(id: u64, identity: Option<(&str, &str)>) -> Event {
        Event {
            id,
            kind: if identity.is_some() {
                "issued"
            } else {
                "bundle-changed"
            }
            .into(),
            namespace: identity.map(|(n, _)| n.to_owned()),
            name: identity.map(|(_, m)| m.to_owned()),
            serial: None,
            at: String::new(),
            reason: None,
        }
    }

    fn rings_with(events: impl IntoIterator<Item = Event>, cap: usize) -> Rings {
        let mut r = Rings::default();
        for e in events {
            r.last = e.id;
            r.keep(e, cap);
        }
        r
    }

    const WEB: Option<(&str, &str)> = Some(("shop", "web"));
    const API: Option<(&str, &str)> = Some(("shop", "api"));

    #[test]
    fn a_flood_by_one_identity_drops_only_its_own_events() {
        // api's pending event, then 50 of web's, with rings of 5.
        let events = std::iter::once(event(1, API))
            .chain((2..=51).map(|id| event(id, WEB)))
            .chain(std::iter::once(event(52, None)));
        let r = rings_with(events, 5);
        let (reset, backlog) = r.after(0, API);
        assert!(reset.is_none(), "api missed nothing it could see");
        let ids: Vec<u64> = backlog.iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 52]);
        // web resuming from 0 missed 46 of its own: told first.
        let (reset, backlog) = r.after(0, WEB);
        let reset = reset.unwrap();
        assert_eq!((reset.kind.as_str(), reset.id), (RESET, 52));
        assert_eq!(reset.reason.as_deref(), Some("ring"));
        let ids: Vec<u64> = backlog.iter().map(|e| e.id).collect();
        assert_eq!(ids, [47, 48, 49, 50, 51, 52]);
        // From 46 on, web missed nothing.
        assert!(r.after(46, WEB).0.is_none());
        // The admin sees every ring: told too, then everything kept.
        let (reset, backlog) = r.after(0, None);
        assert!(reset.is_some());
        assert_eq!(backlog.len(), 7);
        assert_eq!(r.kept.len(), 7, "the index holds what the rings hold");
    }

    #[test]
    fn an_id_from_before_the_floor_is_told() {
        let mut r = rings_with([event(101, API)], 5);
        r.floor = 100;
        // From an earlier process's id: told, then what is kept.
        let (reset, backlog) = r.after(42, API);
        assert_eq!(reset.unwrap().reason.as_deref(), Some("ring"));
        assert_eq!(backlog.len(), 1);
        // From nothing: nothing stale.
        assert!(r.after(0, API).0.is_none());
        // From this process's ids: nothing missed.
        assert!(r.after(100, API).0.is_none());
        assert!(r.after(101, WEB).0.is_none());
    }

    #[test]
    fn all_rings_together_stay_within_the_bound() {
        let names: Vec<String> = (0..MAX_EVENTS / 4 + 10).map(|i| format!("n{i}")).collect();
        let mut r = Rings::default();
        let mut id = 0;
        for round in 0..4 {
            for n in &names {
                id += 1;
                r.last = id;
                r.keep(event(id, Some(("default", n))), 8);
                let _ = round;
            }
        }
        assert_eq!(r.kept.len(), MAX_EVENTS);
        let held: usize = r.by_identity.values().map(|g| g.events.len()).sum();
        assert_eq!(held, MAX_EVENTS);
        // The oldest of all went first: the first names' first events.
        let first = &r.by_identity[&("default".to_owned(), "n0".to_owned())];
        assert_eq!(first.events.len(), 3);
        assert!(r.after(0, Some(("default", "n0"))).0.is_some());
        // A name whose events all stayed was not reset.
        let last = names.last().unwrap();
        assert!(r.after(0, Some(("default", last))).0.is_none());
    }
}
