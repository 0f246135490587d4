//! What one caller may take of the CA, so that no caller can starve the
//! others: issuances per identity, join-token uses, open event streams, and
//! the connections of the API port (with a reserve for the admin and the
//! health probes).
//!
//! # Design
//! Each limit is a [`Limit`] (a type: the 429's message, the audit line and
//! the metrics label all come from it), with a default and a setting in
//! `meshca.toml`'s `[limits]` table ([`Limits`], validated where it is read).
//! Rates are token buckets keyed by who asks ([`Rates`]): a burst of the
//! whole allowance, refilled evenly, so that renewal (about one issuance per
//! certificate lifetime) never meets the limit and a loop meets it at once.
//! Open streams are counted per certificate and per identity
//! ([`Streams`]): several pods of one identity each hold a certificate of
//! their own and a stream each, so the tighter bound is per certificate.
//! The admin is exempt from the per-identity limits (it can do anything
//! these limits protect anyway); its connections are kept room for.
//! A refusal is audited once per limit and caller per [`AUDIT_EVERY`], with
//! how many were refused since, so that a flood does not flood the log.
//! Every table here is bounded: keys whose state is back to rest are
//! dropped when a table grows past [`MAX_KEYS`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// A limit, as the 429, the audit line and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// Certificates per identity per minute (workloads, join tokens).
    IssuancesPerMinute,
    /// Uses of one join token per second.
    TokenUsesPerSecond,
    /// Open event streams per client certificate.
    EventStreamsPerCertificate,
    /// Open event streams per identity.
    EventStreamsPerIdentity,
    /// Connections open on the API port.
    MaxConnections,
}

impl Limit {
    /// Every limit (metrics list them all, from zero).
    pub const ALL: [Limit; 5] = [
        Limit::IssuancesPerMinute,
        Limit::TokenUsesPerSecond,
        Limit::EventStreamsPerCertificate,
        Limit::EventStreamsPerIdentity,
        Limit::MaxConnections,
    ];

    /// The key in `[limits]`, and the metrics label.
    pub fn key(self) -> &'static str {
        match self {
            Limit::IssuancesPerMinute => "issuances_per_minute",
            Limit::TokenUsesPerSecond => "token_uses_per_second",
            Limit::EventStreamsPerCertificate => "event_streams_per_certificate",
            Limit::EventStreamsPerIdentity => "event_streams_per_identity",
            Limit::MaxConnections => "max_connections",
        }
    }

    /// The setting as a user writes it: `limits.issuances_per_minute`.
    pub fn setting(self) -> String {
        format!("limits.{}", self.key())
    }
}

/// The `[limits]` table of `meshca.toml`; every key optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Certificates one identity may get per minute through its own
    /// certificate or a join token (the admin is exempt).
    pub issuances_per_minute: u32,
    /// Uses of one join token per second.
    pub token_uses_per_second: u32,
    /// Event streams open at once per client certificate.
    pub event_streams_per_certificate: u32,
    /// Event streams open at once per identity, across its certificates.
    pub event_streams_per_identity: u32,
    /// Connections open at once on the API port; absent: the process's
    /// open-files limit less 64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Of `max_connections`, how many are kept for the admin and
    /// `/healthz`, `/readyz`; absent: a sixteenth, between 4 and 64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_connections: Option<usize>,
    /// Events kept per identity for a client that resumes
    /// (`Last-Event-ID`).
    pub events_per_identity: usize,
    /// Events kept that concern no one identity (`bundle-changed`).
    pub events_shared: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            issuances_per_minute: 120,
            token_uses_per_second: 20,
            event_streams_per_certificate: 4,
            event_streams_per_identity: 64,
            max_connections: None,
            reserved_connections: None,
            events_per_identity: 256,
            events_shared: 1024,
        }
    }
}

impl Limits {
    /// Checks every value; the error names the setting and the rule.
    pub fn validate(&self) -> Result<(), String> {
        let at_least_one: [(&str, u64); 6] = [
            ("issuances_per_minute", self.issuances_per_minute.into()),
            ("token_uses_per_second", self.token_uses_per_second.into()),
            (
                "event_streams_per_certificate",
                self.event_streams_per_certificate.into(),
            ),
            (
                "event_streams_per_identity",
                self.event_streams_per_identity.into(),
            ),
            ("events_per_identity", self.events_per_identity as u64),
            ("events_shared", self.events_shared as u64),
        ];
        for (key, v) in at_least_one {
            if v == 0 {
                return Err(format!("limits.{key} must be at least 1"));
            }
        }
        if self.max_connections == Some(0) {
            return Err("limits.max_connections must be at least 1".into());
        }
        self.connections().map(|_| ())
    }

    /// The API listener's limits (meshca-tls) with these connection settings.
    pub fn connections(&self) -> Result<meshca_tls::ConnLimits, String> {
        let base = meshca_tls::ConnLimits::default();
        let max = self.max_connections.unwrap_or(base.max_connections);
        let reserved = self
            .reserved_connections
            .unwrap_or_else(|| meshca_tls::default_reserved(max));
        if reserved >= max {
            return Err(format!(
                "limits.reserved_connections ({reserved}) must be below limits.max_connections ({max})"
            ));
        }
        base.with_connections(max, reserved)
            .map_err(|e| e.to_string())
    }
}

/// Audit refusals of one limit and caller at most this often.
pub const AUDIT_EVERY: Duration = Duration::from_secs(10);
/// Past this many keys a table drops the keys at rest.
const MAX_KEYS: usize = 100_000;

/// A token bucket: `burst` at rest, refilled at `per_second`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by who asks, for one [`Limit`].
#[derive(Debug)]
pub struct Rates {
    limit: Limit,
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Rates {
    /// `allowance` per `period`, all of it available at once.
    pub fn new(limit: Limit, allowance: u32, period: Duration) -> Self {
        let burst = f64::from(allowance.max(1));
        Rates {
            limit,
            burst,
            per_second: burst / period.as_secs_f64().max(1e-3),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one for `key`, or says how long until one is there.
    pub fn take(&self, key: &str) -> Result<(), Refused> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &str, now: Instant) -> Result<(), Refused> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let (burst, rate) = (self.burst, self.per_second);
            // Full again: forgetting one changes nothing.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Refused {
                limit: self.limit,
                retry_after: Duration::from_secs_f64((1.0 - b.tokens) / self.per_second),
            })
        }
    }

    /// Whether `key` has one left, taking nothing (a token's bucket is
    /// charged only for uses that proved the secret, so that knowing a
    /// token's id does not let anyone use up its rate).
    pub fn peek(&self, key: &str) -> Result<(), Refused> {
        let now = Instant::now();
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = buckets.get(key) else {
            return Ok(());
        };
        let tokens = (b.tokens
            + now.saturating_duration_since(b.at).as_secs_f64() * self.per_second)
            .min(self.burst);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(Refused {
                limit: self.limit,
                retry_after: Duration::from_secs_f64((1.0 - tokens) / self.per_second),
            })
        }
    }

    /// Gives back one taken for `key` (the request failed before it cost
    /// anything: a refused token, a refused policy).
    pub fn give_back(&self, key: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(self.burst);
        }
    }
}

/// The certificates that have renewed once on schedule: the first renewal
/// of a certificate past half its life is what every agent does once per
/// lifetime, and is not charged to its identity's allowance (so that one
/// pod renewing in a loop cannot starve its siblings' scheduled renewals);
/// any further renewal from it is.
#[derive(Debug, Default)]
pub struct Renewed {
    seen: Mutex<HashMap<String, time::OffsetDateTime>>,
}

impl Renewed {
    /// Whether the renewal of `serial` (valid from `not_before` to
    /// `not_after`) at `now` is its first on schedule; remembers it.
    pub fn first_on_schedule(
        &self,
        serial: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
        now: time::OffsetDateTime,
    ) -> bool {
        let half = not_before + (not_after - not_before) / 2;
        if now < half {
            return false;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_KEYS {
            // An expired certificate renews no more.
            seen.retain(|_, until| *until > now);
        }
        if seen.contains_key(serial) {
            return false;
        }
        // Past the bound even after the sweep: charged, never unbounded.
        if seen.len() >= MAX_KEYS {
            return false;
        }
        seen.insert(serial.to_owned(), not_after);
        true
    }
}

/// A refusal by a limit: which, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    /// The limit met.
    pub limit: Limit,
    /// When the caller may try again.
    pub retry_after: Duration,
}

/// Open event streams per certificate and per identity. The bound per
/// certificate refuses (a pod needs one stream); at the bound per identity
/// the identity's oldest stream is closed to make room instead, so that one
/// pod holding many certificates cannot keep its siblings from listening
/// (a closed stream resumes from its `Last-Event-ID` and misses nothing).
#[derive(Debug)]
pub struct Streams {
    per_certificate: usize,
    per_identity: usize,
    state: Mutex<StreamTable>,
}

#[derive(Debug, Default)]
struct StreamTable {
    next: u64,
    per_certificate: HashMap<String, usize>,
    /// Each identity's open streams, oldest first, with what closes each.
    per_identity: HashMap<String, VecDeque<(u64, Arc<Notify>)>>,
}

/// One open stream, counted until dropped; [`StreamSlot::closed`] says when
/// the server wants it ended (room for a newer stream of its identity).
#[derive(Debug)]
pub struct StreamSlot {
    id: u64,
    identity: String,
    certificate: String,
    close: Arc<Notify>,
    streams: Arc<Streams>,
}

impl StreamSlot {
    /// Resolves when the stream is to be closed to make room.
    pub async fn closed(&self) {
        self.close.notified().await;
    }

    /// What [`StreamSlot::closed`] waits on, to wait without the slot.
    pub fn closer(&self) -> Arc<Notify> {
        self.close.clone()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut t = self.streams.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.per_certificate.get_mut(&self.certificate) {
            *n -= 1;
            if *n == 0 {
                t.per_certificate.remove(&self.certificate);
            }
        }
        if let Some(q) = t.per_identity.get_mut(&self.identity) {
            q.retain(|(id, _)| *id != self.id);
            if q.is_empty() {
                t.per_identity.remove(&self.identity);
            }
        }
    }
}

/// How long a refused stream is asked to wait: streams end when their
/// holder closes them, which the server cannot foresee.
const STREAM_RETRY: Duration = Duration::from_secs(5);

impl Streams {
    /// The limits of `limits`.
    pub fn new(limits: &Limits) -> Self {
        Streams {
            per_certificate: limits.event_streams_per_certificate as usize,
            per_identity: limits.event_streams_per_identity as usize,
            state: Mutex::new(StreamTable::default()),
        }
    }

    /// Opens one for `certificate` (its serial) of `identity`: refused at
    /// the bound per certificate; at the bound per identity, the identity's
    /// oldest stream is told to close.
    pub fn open(
        self: &Arc<Self>,
        identity: &str,
        certificate: &str,
    ) -> Result<StreamSlot, Refused> {
        let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if t.per_certificate.get(certificate).copied().unwrap_or(0) >= self.per_certificate {
            return Err(Refused {
                limit: Limit::EventStreamsPerCertificate,
                retry_after: STREAM_RETRY,
            });
        }
        t.next += 1;
        let id = t.next;
        let close = Arc::new(Notify::new());
        *t.per_certificate.entry(certificate.to_owned()).or_insert(0) += 1;
        let q = t.per_identity.entry(identity.to_owned()).or_default();
        while q.len() >= self.per_identity {
            if let Some((_, oldest)) = q.pop_front() {
                // Stored as a permit if the stream is not waiting yet.
                oldest.notify_one();
            }
        }
        q.push_back((id, close.clone()));
        Ok(StreamSlot {
            id,
            identity: identity.to_owned(),
            certificate: certificate.to_owned(),
            close,
            streams: self.clone(),
        })
    }
}

/// Which refusals are audited: the first of each kind (a limit's key, an
/// error code) and caller per [`AUDIT_EVERY`].
#[derive(Debug, Default)]
pub struct AuditGate {
    seen: Mutex<HashMap<(&'static str, String), Window>>,
}

/// When a kind and caller was last audited, and how many went unwritten
/// since.
type Window = (Instant, u64);

/// `reason`, saying how many more went unwritten since the last line.
pub fn with_quiet(reason: &str, quiet: u64) -> String {
    if quiet > 0 {
        format!("{reason}; {quiet} more refused alike since the last line")
    } else {
        reason.to_owned()
    }
}

impl AuditGate {
    /// `Some(n)`: audit now, `n` refusals having gone unaudited since the
    /// last line; `None`: counted, not audited.
    pub fn admit_key(&self, kind: &'static str, caller: &str) -> Option<u64> {
        self.admit_at(kind, caller, Instant::now())
    }

    fn admit_at(&self, kind: &'static str, caller: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_KEYS {
            seen.retain(|_, (at, _)| now.duration_since(*at) < AUDIT_EVERY);
        }
        match seen.get_mut(&(kind, caller.to_owned())) {
            Some((at, quiet)) if now.duration_since(*at) < AUDIT_EVERY => {
                *quiet += 1;
                None
            }
            Some((at, quiet)) => {
                let n = *quiet;
                *at = now;
                *quiet = 0;
                Some(n)
            }
            None => {
                seen.insert((kind, caller.to_owned()), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_the_allowance_then_the_refill_rate() {
        let r = Rates::new(Limit::IssuancesPerMinute, 3, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..3 {
            r.take_at("shop/web", t0).unwrap();
        }
        let refused = r.take_at("shop/web", t0).unwrap_err();
        assert_eq!(refused.limit, Limit::IssuancesPerMinute);
        // One comes back every 20 s.
        assert!((19.9..=20.1).contains(&refused.retry_after.as_secs_f64()));
        // Another key is not touched.
        r.take_at("shop/api", t0).unwrap();
        assert!(r.take_at("shop/web", t0 + Duration::from_secs(19)).is_err());
        r.take_at("shop/web", t0 + Duration::from_secs(40)).unwrap();
        // A refund makes room at once.
        r.give_back("shop/web");
        r.take_at("shop/web", t0 + Duration::from_secs(40)).unwrap();
    }

    #[test]
    fn only_the_first_renewal_past_half_life_is_on_schedule() {
        let r = Renewed::default();
        let t0 = time::OffsetDateTime::now_utc();
        let end = t0 + time::Duration::hours(24);
        assert!(!r.first_on_schedule("01", t0, end, t0 + time::Duration::hours(11)));
        assert!(r.first_on_schedule("01", t0, end, t0 + time::Duration::hours(16)));
        assert!(!r.first_on_schedule("01", t0, end, t0 + time::Duration::hours(16)));
        assert!(r.first_on_schedule("02", t0, end, t0 + time::Duration::hours(12)));
    }

    #[test]
    fn peeking_takes_nothing() {
        let r = Rates::new(Limit::TokenUsesPerSecond, 1, Duration::from_secs(60));
        r.peek("t").unwrap();
        r.peek("t").unwrap();
        r.take("t").unwrap();
        assert_eq!(r.peek("t").unwrap_err().limit, Limit::TokenUsesPerSecond);
    }

    #[tokio::test]
    async fn streams_are_refused_per_certificate_and_make_room_per_identity() {
        let limits = Limits {
            event_streams_per_certificate: 2,
            event_streams_per_identity: 3,
            ..Limits::default()
        };
        let s = Arc::new(Streams::new(&limits));
        let a1 = s.open("shop/web", "01").unwrap();
        let _a2 = s.open("shop/web", "01").unwrap();
        assert_eq!(
            s.open("shop/web", "01").unwrap_err().limit,
            Limit::EventStreamsPerCertificate
        );
        let _b1 = s.open("shop/web", "02").unwrap();
        // The fourth of the identity: admitted, and the oldest (a1) is told.
        let _c1 = s.open("shop/web", "03").unwrap();
        tokio::time::timeout(Duration::from_secs(1), a1.closed())
            .await
            .unwrap();
        // Another identity is not touched.
        let d = s.open("shop/api", "04").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), d.closed())
                .await
                .is_err()
        );
        drop(a1);
        let _a3 = s.open("shop/web", "01").unwrap();
        assert_eq!(s.state.lock().unwrap().per_certificate["01"], 2);
    }

    #[test]
    fn refusals_are_audited_once_per_window_with_the_count() {
        let g = AuditGate::default();
        let t0 = Instant::now();
        assert_eq!(
            g.admit_at(Limit::TokenUsesPerSecond.key(), "token a", t0),
            Some(0)
        );
        assert_eq!(
            g.admit_at(Limit::TokenUsesPerSecond.key(), "token a", t0),
            None
        );
        assert_eq!(
            g.admit_at(Limit::TokenUsesPerSecond.key(), "token a", t0),
            None
        );
        assert_eq!(
            g.admit_at(Limit::TokenUsesPerSecond.key(), "token b", t0),
            Some(0)
        );
        assert_eq!(
            g.admit_at(Limit::IssuancesPerMinute.key(), "token a", t0),
            Some(0)
        );
        assert_eq!(
            g.admit_at(Limit::TokenUsesPerSecond.key(), "token a", t0 + AUDIT_EVERY),
            Some(2)
        );
        assert_eq!(
            with_quiet("x", 2),
            "x; 2 more refused alike since the last line"
        );
    }

    #[test]
    fn settings_are_checked_naming_the_key() {
        assert!(Limits::default().validate().is_ok());
        let zero = Limits {
            issuances_per_minute: 0,
            ..Limits::default()
        };
        assert_eq!(
            zero.validate().unwrap_err(),
            "limits.issuances_per_minute must be at least 1"
        );
        let reserve = Limits {
            max_connections: Some(10),
            reserved_connections: Some(10),
            ..Limits::default()
        };
        assert!(
            reserve
                .validate()
                .unwrap_err()
                .contains("limits.reserved_connections (10) must be below")
        );
        let parsed: Limits = serde_json::from_str(r#"{"issuances_per_minute": 3}"#).unwrap();
        assert_eq!(parsed.issuances_per_minute, 3);
        assert_eq!(parsed.events_shared, 1024);
        assert!(serde_json::from_str::<Limits>(r#"{"issuance_per_minute": 3}"#).is_err());
    }
}
