//! Which agents are alive and which trust bundle each holds: what makes a
//! root rotation's activation safe. Agents send the fingerprint of the
//! bundle they hold (`x-meshca-bundle`, see `meshca_pki::bundle_fingerprint`)
//! when they renew and when they open the event stream (again after each
//! bundle change); an agent is alive while its stream is open or for ten
//! minutes after it was last heard from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The header an agent reports its bundle's fingerprint in.
pub const BUNDLE_HEADER: &str = "x-meshca-bundle";
/// How long an agent counts as alive after it was last heard from.
const ALIVE_FOR: Duration = Duration::from_secs(600);
/// Most agents remembered (one per identity).
const MAX_AGENTS: usize = 100_000;

#[derive(Debug)]
struct Seen {
    bundle: String,
    at: Instant,
    streams: usize,
}

/// The agents this replica has heard from.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    seen: Mutex<HashMap<String, Seen>>,
}

/// How many alive agents hold the current bundle.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentSummary {
    /// Agents heard from lately or with an open event stream.
    pub alive: usize,
    /// Of those, the ones that hold the current bundle.
    pub acknowledged: usize,
    /// Some of the others (identity), for the operator to look at.
    pub lagging: Vec<String>,
}

/// Held by an open event stream; the agent stays alive until it is dropped.
#[derive(Debug)]
pub struct StreamGuard {
    registry: Arc<AgentRegistry>,
    identity: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut seen = self.registry.lock();
        if let Some(s) = seen.get_mut(&self.identity) {
            s.streams = s.streams.saturating_sub(1);
            s.at = Instant::now();
        }
    }
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `identity` holds the bundle `fingerprint` (a renewal).
    pub fn report(&self, identity: &str, fingerprint: &str) {
        let mut seen = self.lock();
        if seen.len() >= MAX_AGENTS && !seen.contains_key(identity) {
            seen.retain(|_, s| s.streams > 0 || s.at.elapsed() < ALIVE_FOR);
            if seen.len() >= MAX_AGENTS {
                return;
            }
        }
        let s = seen.entry(identity.to_owned()).or_insert(Seen {
            bundle: String::new(),
            at: Instant::now(),
            streams: 0,
        });
        fingerprint.clone_into(&mut s.bundle);
        s.at = Instant::now();
    }

    /// An event stream opened by `identity`, which holds `fingerprint`.
    pub fn stream_opened(self: &Arc<Self>, identity: &str, fingerprint: &str) -> StreamGuard {
        self.report(identity, fingerprint);
        if let Some(s) = self.lock().get_mut(identity) {
            s.streams += 1;
        }
        StreamGuard {
            registry: self.clone(),
            identity: identity.to_owned(),
        }
    }

    /// The alive agents against the bundle fingerprint `current`.
    pub fn summary(&self, current: &str) -> AgentSummary {
        let seen = self.lock();
        let alive: Vec<(&String, &Seen)> = seen
            .iter()
            .filter(|(_, s)| s.streams > 0 || s.at.elapsed() < ALIVE_FOR)
            .collect();
        let mut lagging: Vec<String> = alive
            .iter()
            .filter(|(_, s)| s.bundle != current)
            .map(|(id, _)| (*id).clone())
            .collect();
        lagging.sort();
        let behind = lagging.len();
        lagging.truncate(10);
        AgentSummary {
            alive: alive.len(),
            acknowledged: alive.len() - behind,
            lagging,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn agents_count_while_streaming_and_acknowledge_by_fingerprint() {
        let r = Arc::new(AgentRegistry::default());
        let g = r.stream_opened("default/web", "old");
        r.report("default/db", "new");
        assert_eq!(
            r.summary("new"),
            AgentSummary {
                alive: 2,
                acknowledged: 1,
                lagging: vec!["default/web".into()]
            }
        );
        drop(g);
        let g2 = r.stream_opened("default/web", "new");
        assert_eq!(r.summary("new").acknowledged, 2);
        drop(g2);
        assert_eq!(r.summary("new").alive, 2, "heard from lately");
    }
}
