//! Which agents are alive and which trust bundle each holds: what makes a
//! root rotation's activation safe. Agents send the fingerprint of the
//! bundle they hold (`x-meshca-bundle`, see `meshca_pki::bundle_fingerprint`)
//! when they renew and when they open the event stream (again after each
//! bundle change); an agent is alive while its stream is open or for ten
//! minutes after it was last heard from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The header an agent reports its bundle's fingerprint in.
pub const BUNDLE_HEADER: &str = "x-meshca-bundle";
/// How long an agent counts as alive after it was last heard from.
const ALIVE_FOR: Duration = Duration::from_secs(600);
/// Most agents remembered (one per holder: identity and certificate).
const MAX_AGENTS: usize = 100_000;

#[derive(Debug)]
struct Seen {
    bundle: String,
    at: Instant,
    streams: usize,
    /// Its holder renewed into another certificate (known under that
    /// one's key now): no longer counted, kept while its stream is open.
    renewed: bool,
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

/// What one replica tells the others about its agents (a store blob
/// `agents/<replica>`, rewritten every few seconds): with replicas, an agent
/// is connected to one of them, and activation must count them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedAgents {
    /// When it was written (Unix seconds); a replica that stopped writing is
    /// gone, and its agents have moved to others.
    pub at: i64,
    /// Its alive agents.
    pub agents: Vec<SharedAgent>,
}

/// One agent in [`SharedAgents`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedAgent {
    /// `namespace/name`.
    pub id: String,
    /// The fingerprint of the bundle it holds.
    pub bundle: String,
    /// When it was last heard from (Unix seconds).
    pub seen: i64,
}

/// How long another replica's report counts.
pub const SHARED_FRESH: i64 = 30;

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
            seen.retain(|_, s| s.streams > 0 || (!s.renewed && s.at.elapsed() < ALIVE_FOR));
            if seen.len() >= MAX_AGENTS {
                return;
            }
        }
        let s = seen.entry(identity.to_owned()).or_insert(Seen {
            bundle: String::new(),
            at: Instant::now(),
            streams: 0,
            renewed: false,
        });
        fingerprint.clone_into(&mut s.bundle);
        s.at = Instant::now();
    }

    /// The holder `old` renewed into `new`, holding `fingerprint`: one
    /// holder, counted once, under its new certificate.
    pub fn renewed(&self, old: &str, new: &str, fingerprint: &str) {
        let bundle = {
            let mut seen = self.lock();
            match seen.get_mut(old) {
                Some(s) => {
                    s.renewed = true;
                    Some(if fingerprint.is_empty() {
                        s.bundle.clone()
                    } else {
                        fingerprint.to_owned()
                    })
                }
                None => None,
            }
        };
        if let Some(b) = bundle {
            self.report(new, &b);
        }
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
        self.summary_with(current, &[], 0)
    }

    /// This replica's alive agents, for the others.
    pub fn export(&self, now_unix: i64) -> SharedAgents {
        let seen = self.lock();
        let agents = seen
            .iter()
            .filter(|(_, s)| !s.renewed && (s.streams > 0 || s.at.elapsed() < ALIVE_FOR))
            .map(|(id, s)| SharedAgent {
                id: id.clone(),
                bundle: s.bundle.clone(),
                seen: if s.streams > 0 {
                    now_unix
                } else {
                    now_unix - i64::try_from(s.at.elapsed().as_secs()).unwrap_or(i64::MAX)
                },
            })
            .collect();
        SharedAgents {
            at: now_unix,
            agents,
        }
    }

    /// The alive agents of this replica and of the fresh reports of
    /// others, against `current`; an agent known to several replicas counts
    /// once, with what it said last.
    pub fn summary_with(
        &self,
        current: &str,
        others: &[SharedAgents],
        now_unix: i64,
    ) -> AgentSummary {
        let mut merged: HashMap<String, (i64, String)> = HashMap::new();
        for a in self.export(now_unix).agents {
            merged.insert(a.id, (a.seen, a.bundle));
        }
        let alive_for = i64::try_from(ALIVE_FOR.as_secs()).unwrap_or(i64::MAX);
        for report in others.iter().filter(|r| now_unix - r.at <= SHARED_FRESH) {
            for a in report
                .agents
                .iter()
                .filter(|a| now_unix - a.seen < alive_for)
            {
                match merged.get(&a.id) {
                    Some((seen, _)) if *seen >= a.seen => {}
                    _ => {
                        merged.insert(a.id.clone(), (a.seen, a.bundle.clone()));
                    }
                }
            }
        }
        let mut lagging: Vec<String> = merged
            .iter()
            .filter(|(_, (_, b))| b != current)
            .map(|(id, _)| id.clone())
            .collect();
        lagging.sort();
        let behind = lagging.len();
        lagging.truncate(10);
        AgentSummary {
            alive: merged.len(),
            acknowledged: merged.len() - behind,
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

        // Another replica's agents count too, once each, with what they
        // said last; a stale report does not.
        let other = SharedAgents {
            at: 1000,
            agents: vec![
                SharedAgent {
                    id: "default/api".into(),
                    bundle: "old".into(),
                    seen: 1000,
                },
                SharedAgent {
                    id: "default/db".into(),
                    bundle: "old".into(),
                    seen: 1,
                },
            ],
        };
        let s = r.summary_with("new", std::slice::from_ref(&other), 1000);
        assert_eq!((s.alive, s.acknowledged), (3, 2), "{s:?}");
        assert_eq!(s.lagging, vec!["default/api".to_owned()]);
        let s = r.summary_with("new", &[other], 1000 + SHARED_FRESH + 1);
        assert_eq!(s.alive, 2);
    }

    #[test]
    fn holders_count_one_by_one_and_a_renewal_moves_one() {
        let r = Arc::new(AgentRegistry::default());
        // Two pods of one identity: a stuck one is not hidden by its sibling.
        r.report("shop/web/01", "new");
        r.report("shop/web/02", "old");
        let s = r.summary("new");
        assert_eq!((s.alive, s.acknowledged), (2, 1), "{s:?}");
        assert_eq!(s.lagging, vec!["shop/web/02".to_owned()]);
        // The stuck pod renews (from 02 into 03) holding the new bundle: one
        // holder, acknowledged; its old entry no longer counts, even with
        // its event stream still open.
        let g = r.stream_opened("shop/web/02", "old");
        r.renewed("shop/web/02", "shop/web/03", "new");
        let s = r.summary("new");
        assert_eq!((s.alive, s.acknowledged), (2, 2), "{s:?}");
        drop(g);
    }
}
