//! The limits every listener meshca opens shares: how long a client may take
//! for its handshake, for its request headers, and how long a connection may
//! sit with nothing in flight; and how many connections may be open at once,
//! with a reserve that only some callers may use.
//!
//! # Design
//! One [`ConnLimits`] per listener, from one place ([`ConnLimits::default`]),
//! so that the API, the redirect listener, the proxy and the agent's health
//! port cannot drift apart (the redirect listener once had none of them).
//! A [`Gate`] counts open connections. Up to `max - reserved` are admitted
//! as [`Admission::Normal`]; the next `reserved` are admitted as
//! [`Admission::Reserve`], which the application sees in each request's
//! extensions and may serve only for callers that must always get through
//! (meshca's API: the admin and the health probes); one source address may
//! hold at most half of the reserve, and a reserved connection has 2 s for
//! its handshake and first request; past `max` a connection
//! is closed at once, before any handshake, so that the process never runs
//! out of files (an accept that fails for want of a file descriptor leaves
//! the connection in the kernel's backlog, where it waits and retries).
//! The default `max` follows the process's open-files limit, less what the
//! process needs besides connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body once its headers
/// are in (bodies are small: 64 KiB at most on meshca's API).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The handshake and header limit of a connection in the reserve.
pub const RESERVE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection may have no request in flight before it is closed
/// (the first request included).
pub const IDLE_TIMEOUT: Duration = HEADER_TIMEOUT;
/// Files a process needs besides its connections (store, logs, etcd
/// channels, certificate files being read) and one side listener's
/// [`ConnLimits::small`] cap: kept out of the default cap.
const FILES_BESIDES_CONNECTIONS: usize = 64;
/// The most connections of a side listener (health port, redirect): an
/// eighth of the open-files limit up to this.
pub const SMALL_MAX_CONNECTIONS: usize = 256;
/// The default cap when the open-files limit cannot be read or is huge.
const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// The limits of one listener. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time for the TLS handshake (or, in permissive mode, the first byte).
    pub handshake: Duration,
    /// Time for a request's headers, from its first byte (HTTP/1).
    pub header: Duration,
    /// Time for a request's whole body, from its headers: a request whose
    /// body never comes is in flight, so the idle limit does not end it.
    pub body: Duration,
    /// The handshake and header limits of a connection admitted to the
    /// reserve: it turns over quickly, so that a source cannot sit on it.
    pub reserve_handshake: Duration,
    /// Time a connection may have no request in flight.
    pub idle: Duration,
    /// Connections open at once; past this a new one is closed at once.
    pub max_connections: usize,
    /// Of `max_connections`, how many only [`Admission::Reserve`] may use.
    pub reserved: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        let max = default_max_connections();
        ConnLimits {
            handshake: HANDSHAKE_TIMEOUT,
            header: HEADER_TIMEOUT,
            body: BODY_TIMEOUT,
            reserve_handshake: RESERVE_HANDSHAKE_TIMEOUT,
            idle: IDLE_TIMEOUT,
            max_connections: max,
            reserved: default_reserved(max),
        }
    }
}

/// The open-files soft limit, less what the process needs besides
/// connections (at least 16), capped at a generous default.
pub fn default_max_connections() -> usize {
    match open_files() {
        Some(soft) => soft
            .saturating_sub(FILES_BESIDES_CONNECTIONS + small_max_connections())
            .clamp(16, DEFAULT_MAX_CONNECTIONS.max(16)),
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

fn open_files() -> Option<usize> {
    let (soft, _) = rlimit::Resource::NOFILE.get().ok()?;
    Some(usize::try_from(soft).unwrap_or(usize::MAX))
}

/// A side listener's cap: an eighth of the open-files limit, between 8 and
/// [`SMALL_MAX_CONNECTIONS`] (kept out of the default cap, so a side
/// listener adds nothing to the process's budget).
pub fn small_max_connections() -> usize {
    open_files().map_or(SMALL_MAX_CONNECTIONS, |n| {
        (n / 8).clamp(8, SMALL_MAX_CONNECTIONS)
    })
}

/// The reserve kept out of `max`: a sixteenth, between 4 and 64.
pub fn default_reserved(max: usize) -> usize {
    (max / 16).clamp(4, 64).min(max / 2)
}

impl ConnLimits {
    /// These limits with a connection cap and reserve (a setting), checked:
    /// the reserve must leave room for ordinary connections.
    pub fn with_connections(
        mut self,
        max: usize,
        reserved: usize,
    ) -> Result<Self, crate::TlsError> {
        if max == 0 || reserved >= max {
            return Err(crate::TlsError::Config(format!(
                "the connection limit needs max_connections >= 1 and reserved_connections below it (got {max} and {reserved})"
            )));
        }
        self.max_connections = max;
        self.reserved = reserved;
        Ok(self)
    }

    /// The limits of a side listener (a health port, the redirect): the same
    /// timeouts, and a cap of [`small_max_connections`] taken from the files
    /// kept out of the default cap, so that it adds nothing to the process's
    /// budget.
    pub fn small() -> Self {
        ConnLimits {
            max_connections: small_max_connections(),
            reserved: 0,
            ..ConnLimits::default()
        }
    }

    /// A gate counting this listener's connections.
    pub fn gate(&self) -> Gate {
        Gate {
            open: Arc::new(AtomicUsize::new(0)),
            max: self.max_connections,
            normal: self.max_connections - self.reserved.min(self.max_connections),
            per_source: (self.reserved / 2).max(1),
            reserve_by_source: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// How a connection was let in: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the ordinary share.
    Normal,
    /// Within the reserve: the application serves only callers that must
    /// always get through, and asks the others to come back.
    Reserve,
}

/// Reserved places held, by source address.
type BySource = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Counts one listener's open connections, and the reserve's per source.
#[derive(Debug, Clone)]
pub struct Gate {
    open: Arc<AtomicUsize>,
    max: usize,
    normal: usize,
    /// Reserved places one source address may hold at once.
    per_source: usize,
    reserve_by_source: BySource,
}

/// One admitted connection, until dropped.
#[derive(Debug)]
pub struct Slot {
    open: Arc<AtomicUsize>,
    /// How it was admitted.
    pub admission: Admission,
    /// The reserve's count for this source, when admitted to the reserve.
    source: Option<(IpAddr, BySource)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        if let Some((ip, by_source)) = &self.source {
            let mut m = by_source.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(ip);
                }
            }
        }
    }
}

impl Gate {
    /// Admits one more connection from `source`, or `None`: at the cap, or
    /// into the reserve when this source holds its share of it already (so
    /// that one address cannot fill the reserve too).
    pub fn admit(&self, source: IpAddr) -> Option<Slot> {
        let before = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        let mut slot = Slot {
            open: self.open.clone(),
            admission: Admission::Normal,
            source: None,
        };
        if before >= self.normal {
            slot.admission = Admission::Reserve;
            let mut m = self
                .reserve_by_source
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let held = m.entry(source).or_insert(0);
            if *held >= self.per_source {
                // Dropping the slot gives the place back.
                return None;
            }
            *held += 1;
            drop(m);
            slot.source = Some((source, self.reserve_by_source.clone()));
        }
        Some(slot)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_comes_after_the_ordinary_share_and_the_cap_is_hard() {
        let limits = ConnLimits::default().with_connections(4, 1).unwrap();
        let gate = limits.gate();
        let normal: Vec<Slot> = (0..3).map(|_| gate.admit(A).unwrap()).collect();
        assert!(normal.iter().all(|s| s.admission == Admission::Normal));
        let reserve = gate.admit(A).unwrap();
        assert_eq!(reserve.admission, Admission::Reserve);
        assert!(gate.admit(B).is_none(), "past the cap");
        assert_eq!(gate.open(), 4);
        drop(reserve);
        assert_eq!(gate.admit(B).unwrap().admission, Admission::Reserve);
        drop(normal);
        assert_eq!(gate.open(), 0);
        assert_eq!(gate.admit(A).unwrap().admission, Admission::Normal);
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn one_source_holds_at_most_half_of_the_reserve() {
        let gate = ConnLimits::default().with_connections(8, 4).unwrap().gate();
        let _normal: Vec<Slot> = (0..4).map(|_| gate.admit(A).unwrap()).collect();
        let a: Vec<Slot> = (0..2).map(|_| gate.admit(A).unwrap()).collect();
        assert!(a.iter().all(|s| s.admission == Admission::Reserve));
        assert!(gate.admit(A).is_none(), "A holds its half of the reserve");
        assert_eq!(gate.open(), 6, "a refused admission holds no place");
        let b = gate.admit(B).unwrap();
        assert_eq!(b.admission, Admission::Reserve);
        drop(a);
        assert!(gate.admit(A).is_some());
    }

    #[test]
    fn settings_are_checked() {
        assert!(ConnLimits::default().with_connections(0, 0).is_err());
        assert!(ConnLimits::default().with_connections(8, 8).is_err());
        assert!(ConnLimits::default().with_connections(8, 0).is_ok());
    }

    #[test]
    fn default_reserve_leaves_most_for_ordinary_connections() {
        assert_eq!(default_reserved(16), 4);
        assert_eq!(default_reserved(4096), 64);
        assert_eq!(default_reserved(200), 12);
        assert_eq!(default_reserved(6), 3);
        let d = ConnLimits::default();
        assert!(d.reserved < d.max_connections && d.max_connections >= 16);
    }
}
