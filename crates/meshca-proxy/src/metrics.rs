//! Counters of a proxy process, rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Why a connection ended before any byte reached the target, or how it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Proxied (whatever happened later).
    Proxied,
    /// The TLS handshake failed (see the handshake failure reasons).
    HandshakeFailed,
    /// The target could not be reached.
    TargetUnreachable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Proxied => "proxied",
            Outcome::HandshakeFailed => "handshake_failed",
            Outcome::TargetUnreachable => "target_unreachable",
        }
    }
}

/// Most distinct peer identities counted per route (bounded cardinality).
const MAX_PEERS: usize = 1000;

#[derive(Debug, Default)]
struct Counters {
    connections: BTreeMap<(String, Outcome), u64>,
    active: BTreeMap<String, i64>,
    bytes: BTreeMap<(String, &'static str), u64>,
    handshake_failures: BTreeMap<(String, &'static str), u64>,
    peers: BTreeMap<(String, String), u64>,
    idle_closed: BTreeMap<String, u64>,
}

/// The proxy's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    c: Mutex<Counters>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        f(&mut self.c.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn connection(&self, route: &str, outcome: Outcome) {
        self.with(|c| {
            *c.connections
                .entry((route.to_owned(), outcome))
                .or_default() += 1
        });
    }

    pub(crate) fn active(&self, route: &str, delta: i64) {
        self.with(|c| *c.active.entry(route.to_owned()).or_default() += delta);
    }

    /// Active connections over all routes.
    pub fn active_total(&self) -> i64 {
        self.with(|c| c.active.values().sum())
    }

    pub(crate) fn bytes(&self, route: &str, direction: &'static str, n: u64) {
        self.with(|c| *c.bytes.entry((route.to_owned(), direction)).or_default() += n);
    }

    pub(crate) fn handshake_failure(&self, route: &str, reason: &'static str) {
        self.with(|c| {
            *c.handshake_failures
                .entry((route.to_owned(), reason))
                .or_default() += 1;
        });
    }

    pub(crate) fn peer(&self, route: &str, identity: &str) {
        self.with(|c| {
            let key = (route.to_owned(), identity.to_owned());
            if c.peers.contains_key(&key) || c.peers.len() < MAX_PEERS {
                *c.peers.entry(key).or_default() += 1;
            }
        });
    }

    pub(crate) fn idle_closed(&self, route: &str) {
        self.with(|c| *c.idle_closed.entry(route.to_owned()).or_default() += 1);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        self.with(|c| {
            let mut out = String::new();
            let _ = writeln!(out, "# HELP meshca_proxy_connections_total Connections by route and outcome.\n# TYPE meshca_proxy_connections_total counter");
            for ((r, o), n) in &c.connections {
                let _ = writeln!(out, "meshca_proxy_connections_total{{route=\"{r}\",outcome=\"{}\"}} {n}", o.label());
            }
            let _ = writeln!(out, "# HELP meshca_proxy_connections_active Open proxied connections.\n# TYPE meshca_proxy_connections_active gauge");
            for (r, n) in &c.active {
                let _ = writeln!(out, "meshca_proxy_connections_active{{route=\"{r}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP meshca_proxy_bytes_total Bytes forwarded; in = from the accepted side, out = from the target.\n# TYPE meshca_proxy_bytes_total counter");
            for ((r, d), n) in &c.bytes {
                let _ = writeln!(out, "meshca_proxy_bytes_total{{route=\"{r}\",direction=\"{d}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP meshca_proxy_handshake_failures_total TLS handshakes that failed, by reason.\n# TYPE meshca_proxy_handshake_failures_total counter");
            for ((r, why), n) in &c.handshake_failures {
                let _ = writeln!(out, "meshca_proxy_handshake_failures_total{{route=\"{r}\",reason=\"{why}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP meshca_proxy_peer_connections_total Connections by verified peer identity.\n# TYPE meshca_proxy_peer_connections_total counter");
            for ((r, id), n) in &c.peers {
                let id = id.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "meshca_proxy_peer_connections_total{{route=\"{r}\",peer=\"{id}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP meshca_proxy_idle_closed_total Connections closed after the idle timeout.\n# TYPE meshca_proxy_idle_closed_total counter");
            for (r, n) in &c.idle_closed {
                let _ = writeln!(out, "meshca_proxy_idle_closed_total{{route=\"{r}\"}} {n}");
            }
            out
        })
    }
}
