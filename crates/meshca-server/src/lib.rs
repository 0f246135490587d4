//! The CA as a service: an HTTPS+JSON API under `/v1`, served through
//! `meshca-tls`, that only ever gives a caller the identity it is entitled to.
//!
//! # Design
//! The listener runs `meshca-tls` in permissive mode so that one port takes
//! TLS with an optional client certificate (admin, or a workload renewing
//! itself) and answers a plaintext request with a clear 400 instead of a
//! broken handshake. Every request is authenticated ([`auth`]): the client
//! certificate is checked against the store (issued by this CA, not revoked),
//! a join token is checked by hash in constant time and consumed atomically
//! where it buys a certificate. The [`Authority`] applies policy, signs and
//! records; only after the record is durable does the caller get an answer.
//! Each decision goes to the audit log, each change to the event stream
//! (server-sent events with `Last-Event-ID` resume), and to the metrics.
//! The server's own certificate is issued by its CA into `DIR/server/` and
//! renewed by the server at a third of its lifetime left; `meshca-tls` picks
//! up the new files without a restart.
#![forbid(unsafe_code)]

pub mod agents;
mod api;
pub mod audit;
pub mod auth;
mod error;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod views;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use meshca_issuer::{Authority, IssueRequest, PolicyRule};
use meshca_pki::{KeyType, Profile, RevokedEntry};
use meshca_store::{CertFilter, CertStatus, Store};
use meshca_tls::{Peer, TlsAcceptor, TlsConfig, TlsMode};
use time::OffsetDateTime;

pub use error::ApiError;

/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest oversized body still read to the end before the 413.
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;
/// Lifetime of the server's own certificate.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a CRL is valid; it is remade at half of that, and on revocation.
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The CRLs as made: when, for which revocation generation and trust
/// bundle (fingerprint), and the DERs.
type CachedCrls = (Instant, u64, String, Vec<Vec<u8>>);

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// Policy, signing and records.
    pub authority: Authority,
    /// The store (the authority's).
    pub store: Arc<dyn Store>,
    /// Workload policy rules.
    pub rules: Vec<PolicyRule>,
    /// Key type for generated keys when none is asked for.
    pub key_type: KeyType,
    /// This replica's view of the event log.
    pub events: Arc<events::Events>,
    /// Whether this replica leads (runs the scheduled work); set by [`run`].
    pub leader: std::sync::OnceLock<meshca_store::Leadership>,
    /// This replica's name in the leader election.
    pub replica: String,
    /// Client certificates seen lately and whether they are revoked.
    pub peers: auth::PeerCache,
    /// The audit log.
    pub audit: audit::Audit,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// The API listener's acceptor, once serving (a rotation step waits
    /// for it to take the new bundle).
    pub tls: std::sync::OnceLock<Arc<TlsAcceptor>>,
    /// The agents heard from and the bundle each holds.
    pub agents: Arc<agents::AgentRegistry>,
    /// The data directory (new hierarchies' key files, embedded store).
    pub dir: std::path::PathBuf,
    /// The seal key of CA keys in a shared store (rotation seals new keys).
    pub seal: Option<meshca_pki::SealKey>,
    /// Set when the server's own certificate must come from the signing
    /// hierarchy at the next check (a root rotation's activation).
    pub server_cert_stale: std::sync::atomic::AtomicBool,
    /// How long records of expired certificates are kept.
    pub keep_expired: Duration,
    /// How long records of superseded expired certificates are kept.
    pub keep_superseded: Duration,
    /// When made, the revocation generation and trust bundle it was made
    /// for (a new hierarchy adds a CRL), and the CRLs.
    crl: tokio::sync::Mutex<Option<CachedCrls>>,
    /// The chain of custody as served, and when it was read (anonymous
    /// callers get it from memory, at most CUSTODY_STALE old).
    pub custody: tokio::sync::Mutex<Option<(Instant, String, String)>>,
    crl_generation: AtomicU64,
    crl_number: AtomicU64,
    /// The `[limits]` settings.
    pub limits: limits::Limits,
    /// Issuances per identity (workloads, join tokens).
    pub issuances: limits::Rates,
    /// Uses per join token.
    pub token_uses: limits::Rates,
    /// Open event streams.
    pub streams: Arc<limits::Streams>,
    /// Which limit refusals are audited.
    pub limit_audit: limits::AuditGate,
    /// Certificates that renewed once on schedule.
    pub renewed: limits::Renewed,
    /// Scheduled renewals per identity (an allowance as large as
    /// `issuances`, of their own).
    pub scheduled: limits::Rates,
    /// The store-wide figures of `/metrics`, made at most every
    /// [`GAUGES_STALE`] and never while a scrape waits.
    gauges: std::sync::Mutex<GaugeCache>,
    gauges_made: tokio::sync::watch::Sender<u64>,
    /// The last store check of `/readyz`, and when.
    pub(crate) ready: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

/// How old the store-wide figures of `/metrics` (certificates by status,
/// the earliest leaf expiry) may be: a scrape is answered from memory, and
/// one that finds them older starts one refresh in the background.
pub const GAUGES_STALE: Duration = Duration::from_secs(30);

/// The certificates by status and the earliest leaf expiry, as last counted.
#[derive(Debug, Clone)]
pub struct Gauges {
    /// Records by status (`active`, `expired`, `revoked`).
    pub by_status: std::collections::BTreeMap<&'static str, u64>,
    /// When the first live leaf expires.
    pub earliest_leaf: Option<OffsetDateTime>,
}

#[derive(Debug, Default)]
struct GaugeCache {
    /// The last count (or why it failed) and when it was made.
    value: Option<(Instant, Result<Gauges, String>)>,
    refreshing: bool,
}

impl AppState {
    /// Wires the state; the audit log goes to `dir/audit.log`.
    pub fn new(
        dir: &Path,
        authority: Authority,
        rules: Vec<PolicyRule>,
        key_type: KeyType,
    ) -> std::io::Result<Self> {
        let store = authority.store().clone();
        Ok(AppState {
            authority,
            store: store.clone(),
            rules,
            key_type,
            events: Arc::new(events::Events::new(Arc::clone(&store))),
            leader: std::sync::OnceLock::new(),
            replica: replica_name(),
            peers: auth::PeerCache::default(),
            audit: audit::Audit::open(&dir.join("audit.log"))?,
            metrics: metrics::Metrics::default(),
            tls: std::sync::OnceLock::new(),
            agents: Arc::new(agents::AgentRegistry::default()),
            dir: dir.to_owned(),
            seal: None,
            server_cert_stale: std::sync::atomic::AtomicBool::new(false),
            keep_expired: DEFAULT_KEEP_EXPIRED,
            keep_superseded: DEFAULT_KEEP_SUPERSEDED,
            crl: tokio::sync::Mutex::new(None),
            custody: tokio::sync::Mutex::new(None),
            crl_generation: AtomicU64::new(0),
            crl_number: AtomicU64::new(
                u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(1),
            ),
            limits: limits::Limits::default(),
            issuances: limits::Rates::new(limits::Limit::IssuancesPerMinute, 120, MINUTE),
            token_uses: limits::Rates::new(limits::Limit::TokenUsesPerSecond, 20, SECOND),
            streams: Arc::new(limits::Streams::new(&limits::Limits::default())),
            limit_audit: limits::AuditGate::default(),
            renewed: limits::Renewed::default(),
            scheduled: limits::Rates::new(limits::Limit::IssuancesPerMinute, 120, MINUTE),
            gauges: std::sync::Mutex::new(GaugeCache::default()),
            gauges_made: tokio::sync::watch::channel(0).0,
            ready: tokio::sync::Mutex::new(None),
        }
        .with_limits(limits::Limits::default()))
    }

    /// Sets the `[limits]` (before serving: the event rings are made anew).
    pub fn with_limits(mut self, l: limits::Limits) -> Self {
        self.scheduled = limits::Rates::new(
            limits::Limit::IssuancesPerMinute,
            l.issuances_per_minute,
            MINUTE,
        );
        self.issuances = limits::Rates::new(
            limits::Limit::IssuancesPerMinute,
            l.issuances_per_minute,
            MINUTE,
        );
        self.token_uses = limits::Rates::new(
            limits::Limit::TokenUsesPerSecond,
            l.token_uses_per_second,
            SECOND,
        );
        self.streams = Arc::new(limits::Streams::new(&l));
        self.events = Arc::new(events::Events::with_retention(
            self.store.clone(),
            l.events_per_identity,
            l.events_shared,
        ));
        self.limits = l;
        self
    }

    /// The answer to a caller refused by a limit: a 429 naming the setting,
    /// with `Retry-After`; counted, and audited once per limit and caller
    /// per [`limits::AUDIT_EVERY`].
    pub fn limited(
        &self,
        refused: limits::Refused,
        action: &str,
        caller: &str,
        identity: Option<&str>,
        what: &str,
    ) -> ApiError {
        let wait = refused.retry_after.as_secs_f64().ceil().max(1.0);
        let message = format!(
            "{}: {what} ({caller}); retry in {wait}s",
            refused.limit.setting()
        );
        self.metrics.limited(refused.limit);
        if let Some(quiet) = self.limit_audit.admit_key(refused.limit.key(), caller) {
            let reason = limits::with_quiet(&message, quiet);
            self.audit
                .record(action, caller, identity, None, "refused", Some(&reason));
        }
        if refused.limit == limits::Limit::MaxConnections {
            ApiError::unavailable_for(message, refused.retry_after)
        } else {
            ApiError::rate_limited(message, refused.retry_after)
        }
    }

    /// Audits a refusal, at most once per error code and `key` (who the
    /// refusal is throttled for) every [`limits::AUDIT_EVERY`], with how many
    /// went unwritten since: a flood of bad requests does not fill the disk.
    pub fn audit_refusal(
        &self,
        action: &str,
        caller: &str,
        key: &str,
        identity: Option<&str>,
        e: &ApiError,
    ) {
        if let Some(quiet) = self.limit_audit.admit_key(e.code, key) {
            let reason = limits::with_quiet(&e.message, quiet);
            self.audit
                .record(action, caller, identity, None, "refused", Some(&reason));
        }
    }

    /// The store-wide figures of `/metrics`: from memory, at most
    /// [`GAUGES_STALE`] old; an older copy is served while one refresh runs
    /// in the background. Only the very first scrape waits for a count.
    pub async fn gauges(self: &Arc<Self>) -> Result<Gauges, ApiError> {
        let mut made = self.gauges_made.subscribe();
        loop {
            let start = {
                let mut cache = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
                let stale = cache
                    .value
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= GAUGES_STALE);
                let start = stale && !cache.refreshing;
                if start {
                    cache.refreshing = true;
                }
                if let Some((_, v)) = &cache.value {
                    if start {
                        self.refresh_gauges();
                    }
                    return v.clone().map_err(ApiError::internal);
                }
                start
            };
            if start {
                self.refresh_gauges();
            }
            // The first count is on its way.
            if made.changed().await.is_err() {
                return Err(ApiError::internal("the metrics are not being counted"));
            }
        }
    }

    fn refresh_gauges(self: &Arc<Self>) {
        let st = self.clone();
        tokio::spawn(async move {
            let counted = count_gauges(&st).await.map_err(|e| e.message);
            let mut cache = st.gauges.lock().unwrap_or_else(|e| e.into_inner());
            cache.value = Some((Instant::now(), counted));
            cache.refreshing = false;
            st.gauges_made.send_modify(|n| *n += 1);
        });
    }

    /// Sets how long records of expired certificates are kept.
    pub fn with_keep_expired(mut self, keep: Duration) -> Self {
        self.keep_expired = keep;
        self
    }

    /// Sets how long records of superseded expired certificates are kept.
    pub fn with_keep_superseded(mut self, keep: Duration) -> Self {
        self.keep_superseded = keep;
        self
    }

    /// Gives the seal key of a shared store (root rotation seals the new keys).
    pub fn with_seal(mut self, seal: Option<meshca_pki::SealKey>) -> Self {
        self.seal = seal;
        self
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.leader.get().is_some_and(|l| *l.borrow())
    }

    /// Forgets the cached CRL (after a revocation).
    pub fn invalidate_crl(&self) {
        // A CRL made before this moment is not served again.
        self.crl_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The issuing CA's CRL (DER): the first of [`AppState::crls`].
    pub async fn crl(&self) -> Result<Vec<u8>, ApiError> {
        self.crls()
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::unavailable("the issuer made no CRL"))
    }

    /// The CRLs of every issuing CA in the bundle (DER, the signing one
    /// first), remade when older than half their validity.
    pub async fn crls(&self) -> Result<Vec<Vec<u8>>, ApiError> {
        let mut cached = self.crl.lock().await;
        let generation = self.crl_generation.load(Ordering::SeqCst);
        // Before the election has run (tests, `init`) this process is alone.
        let leading = self.leader.get().is_none_or(|l| *l.borrow());
        let max_age = if leading {
            CRL_VALIDITY / 2
        } else {
            FOLLOWER_CRL_CACHE
        };
        let bundle = meshca_pki::bundle_fingerprint(&self.authority.issuer().trust_bundle().await?);
        if let Some((made, made_gen, made_for, ders)) = cached.as_ref()
            && made.elapsed() < max_age
            && *made_gen == generation
            && *made_for == bundle
        {
            return Ok(ders.clone());
        }
        let stored = self.stored_crl().await;
        let now = OffsetDateTime::now_utc();
        if !leading {
            // The leader makes the CRL; the others serve what it stored.
            if let Some(c) = &stored {
                let age = Duration::try_from(now - c.made_at).unwrap_or_default();
                if age < CRL_VALIDITY / 2 && c.bundle == bundle {
                    *cached = Some((Instant::now(), generation, bundle, c.ders.clone()));
                    return Ok(c.ders.clone());
                }
            }
        }
        let filter = CertFilter {
            status: Some(CertStatus::Revoked),
            ..Default::default()
        };
        let revoked: Vec<(String, RevokedEntry)> = self
            .store
            .list_certificates(&filter)
            .await?
            .into_iter()
            // An expired certificate need not stay on the list (RFC 5280 §3.3).
            .filter(|r| r.not_after > now)
            .map(|r| {
                (
                    r.hierarchy_id,
                    RevokedEntry {
                        serial: r.serial,
                        revoked_at: r.revoked_at.unwrap_or(now),
                        reason_code: reason_code(r.revocation_reason),
                    },
                )
            })
            .collect();
        // CRL numbers only grow, whichever replica made the last one.
        let number = self
            .crl_number
            .fetch_add(1, Ordering::SeqCst)
            .max(stored.as_ref().map_or(0, |c| c.number + 1));
        self.crl_number.fetch_max(number + 1, Ordering::SeqCst);
        let ders = self
            .authority
            .issuer()
            .crls(revoked, number, CRL_VALIDITY)
            .await?;
        if leading {
            let blob = StoredCrl {
                number,
                made_at: now,
                bundle: bundle.clone(),
                ders: ders.clone(),
            };
            if let Err(e) = self.store.put_blob(CRL_BLOB, &blob.encode()).await {
                tracing::warn!("the new CRL is served here but not shared: {e}");
            }
        }
        *cached = Some((Instant::now(), generation, bundle, ders.clone()));
        Ok(ders)
    }

    async fn stored_crl(&self) -> Option<StoredCrl> {
        match self.store.get_blob(CRL_BLOB).await {
            Ok(Some(bytes)) => StoredCrl::decode(&bytes),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!("reading the shared CRL: {e}");
                None
            }
        }
    }

    /// SHA-256 of the active root, what agents pin.
    pub async fn root_fingerprint(&self) -> Result<String, ApiError> {
        let bundle = self.authority.issuer().trust_bundle().await?;
        bundle
            .first()
            .map(|d| meshca_pki::fingerprint(d))
            .ok_or_else(|| ApiError::internal("the trust bundle is empty"))
    }
}

/// Records read per store call when counting.
const GAUGE_PAGE: usize = 1000;

const MINUTE: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);

/// Counts the records by status and finds the earliest leaf expiry: one
/// scan of the store, made by [`AppState::gauges`] in the background.
async fn count_gauges(s: &AppState) -> Result<Gauges, ApiError> {
    let now = OffsetDateTime::now_utc();
    let mut by_status = std::collections::BTreeMap::new();
    let mut earliest_leaf: Option<OffsetDateTime> = None;
    // Page by page: the memory of a page, not of the store.
    let mut after: Option<meshca_pki::Serial> = None;
    loop {
        let page = s
            .store
            .list_certificates_page(&CertFilter::default(), after.as_ref(), GAUGE_PAGE)
            .await?;
        for r in &page.records {
            let status = r.status_at(now);
            if status == "active" {
                earliest_leaf = Some(earliest_leaf.map_or(r.not_after, |e| e.min(r.not_after)));
            }
            *by_status.entry(status).or_insert(0u64) += 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        // Leave room for the requests that wait (a single-threaded runtime).
        tokio::task::yield_now().await;
    }
    Ok(Gauges {
        by_status,
        earliest_leaf,
    })
}

/// The blob under which the leader shares the CRL it made.
const CRL_BLOB: &str = "crl";
/// How long a follower serves the shared CRL before reading it again.
const FOLLOWER_CRL_CACHE: Duration = Duration::from_secs(5);

/// The CRL as the store keeps it for every replica.
struct StoredCrl {
    number: u64,
    made_at: OffsetDateTime,
    /// The fingerprint of the trust bundle it was made for.
    bundle: String,
    /// One per issuing CA, the signing one first.
    ders: Vec<Vec<u8>>,
}

impl StoredCrl {
    fn encode(&self) -> Vec<u8> {
        serde_json::json!({
            "number": self.number,
            "made_at": self.made_at.unix_timestamp(),
            // The signing CA's alone too, for replicas of before per-issuer CRLs.
            "der": self.ders.first().map(hex::encode).unwrap_or_default(),
            "bundle": self.bundle,
            "ders": self.ders.iter().map(hex::encode).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let ders = match v.get("ders").and_then(|d| d.as_array()) {
            Some(list) => list
                .iter()
                .map(|d| d.as_str().and_then(|h| hex::decode(h).ok()))
                .collect::<Option<Vec<_>>>()?,
            None => vec![hex::decode(v.get("der")?.as_str()?).ok()?],
        };
        Some(StoredCrl {
            number: v.get("number")?.as_u64()?,
            made_at: OffsetDateTime::from_unix_timestamp(v.get("made_at")?.as_i64()?).ok()?,
            bundle: v
                .get("bundle")
                .and_then(|b| b.as_str())
                .unwrap_or_default()
                .to_owned(),
            ders,
        })
    }
}

fn reason_code(r: Option<meshca_store::RevocationReason>) -> u8 {
    use meshca_store::RevocationReason as R;
    match r {
        Some(R::KeyCompromise) => 1,
        Some(R::CaCompromise) => 2,
        Some(R::AffiliationChanged) => 3,
        Some(R::Superseded) => 4,
        Some(R::CessationOfOperation) => 5,
        Some(R::PrivilegeWithdrawn) => 9,
        _ => 0,
    }
}

/// The plain-HTTP guard, body limit and request counter around every route.
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let plaintext = req.extensions().get::<Peer>().is_some_and(|p| !p.tls);
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let reserve =
        req.extensions().get::<meshca_tls::Admission>() == Some(&meshca_tls::Admission::Reserve);
    let response = if reserve {
        // Past the ordinary share of connections: only the admin is served
        // as usual, so that it can still act on a flood; a health probe is
        // answered once; anyone else is asked to come back. Either way the
        // place is given back at once.
        let who = match req.extensions().get::<Peer>() {
            Some(peer) => auth::authenticate(&state, peer, req.headers()).await.ok(),
            None => None,
        };
        let health = matches!(req.uri().path(), "/healthz" | "/readyz");
        let close = req
            .extensions()
            .get::<meshca_tls::CloseConnection>()
            .cloned();
        if matches!(who, Some(auth::Caller::Admin)) {
            next.run(req).await
        } else {
            let mut resp = if health {
                next.run(req).await
            } else {
                // A verified certificate names its holder; anything else (a
                // token's id is not verified here) is one caller.
                let caller = match &who {
                    Some(w @ auth::Caller::Workload(_)) => w.describe(),
                    _ => "anonymous".to_owned(),
                };
                let refused = limits::Refused {
                    limit: limits::Limit::MaxConnections,
                    retry_after: Duration::from_secs(1),
                };
                state
                    .limited(
                        refused,
                        "connect",
                        &caller,
                        None,
                        "the API port is at its connection limit; only the admin and /healthz, /readyz are served until connections close",
                    )
                    .into_response()
            };
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            // HTTP/2 ignores that header: the connection is ended too.
            if let Some(close) = &close {
                close.close();
            }
            resp
        }
    } else if plaintext {
        ApiError::bad_request(
            "this port speaks HTTPS only: use https:// (a plain HTTP request reached the TLS port)",
        )
        .into_response()
    } else if let Some(n) = declared.filter(|n| *n > MAX_BODY) {
        // Read (and drop) a moderately oversized body before answering, so the
        // client sees the 413 instead of a reset stream; a huge one is not read.
        if n <= DRAIN_LIMIT {
            let _ = axum::body::to_bytes(req.into_body(), DRAIN_LIMIT).await;
        }
        ApiError::too_large(format!(
            "request bodies are limited to {MAX_BODY} bytes; this one has {n}"
        ))
        .into_response()
    } else {
        let resp = next.run(req).await;
        if resp.status() == http::StatusCode::PAYLOAD_TOO_LARGE
            && resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_none_or(|v| v != "application/json")
        {
            ApiError::too_large(format!("request bodies are limited to {MAX_BODY} bytes"))
                .into_response()
        } else {
            resp
        }
    };
    state.metrics.request(response.status().as_u16());
    response
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/sign", post(api::sign))
        .route("/v1/issue", post(api::issue))
        .route("/v1/certificates", get(api::list))
        .route("/v1/certificates/{serial}", get(api::get_certificate))
        .route("/v1/certificates/{serial}/revoke", post(api::revoke))
        .route("/v1/identities", get(api::identity_by_cn))
        .route(
            "/v1/identities/{ns}/{name}",
            get(api::get_identity).delete(api::release_identity),
        )
        .route(
            "/v1/identities/{ns}/{name}/rotate",
            post(api::rotate_identity),
        )
        .route("/v1/rotate", post(api::rotate_all))
        .route("/v1/bundle", get(api::bundle))
        .route("/v1/bundle/custody", get(api::custody))
        .route("/v1/crl", get(api::crl))
        .route("/v1/crls", get(api::crls))
        .route("/v1/tokens", post(api::create_token).get(api::list_tokens))
        .route("/v1/tokens/{id}", delete(api::delete_token))
        .route("/v1/ca", get(api::ca_status))
        .route("/v1/ca/rotate/{step}", post(api::rotate_root))
        .route("/v1/events", get(api::events))
        .route("/v1/openapi.json", get(api::openapi))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The data directory.
    pub dir: PathBuf,
    /// The API address.
    pub listen: SocketAddr,
    /// A plain listener that redirects to the API.
    pub http_redirect: Option<SocketAddr>,
    /// Extra names for the server's certificate.
    pub server_names: Vec<String>,
}

/// Why `serve` stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// The server's certificate could not be made or loaded.
    Certificate(String),
    /// A listener could not be opened.
    Listen(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Certificate(e) => write!(f, "the server's own certificate: {e}"),
            ServeError::Listen(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServeError {}

fn server_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let host = host.trim();
    if meshca_pki::validate_dns_name(host).is_ok() {
        names.push(host.to_ascii_lowercase());
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// Issues the server's own certificate into `dir/server/` when it is
/// missing, names other hosts, or has less than a third of its life left.
pub async fn ensure_server_cert(
    state: &AppState,
    dir: &Path,
    extra_names: &[String],
) -> Result<bool, String> {
    let out = dir.join("server");
    let names = server_names(extra_names);
    let now = OffsetDateTime::now_utc();
    // An upstream CA may cap lifetimes (a Vault role's max_ttl).
    let ttl = state
        .authority
        .issuer()
        .max_ttl(Profile::Server)
        .map_or(SERVER_CERT_TTL, |max| SERVER_CERT_TTL.min(max));
    if let Ok(set) = meshca_tls::CertSet::load(&meshca_tls::CertPaths::in_dir(&out)) {
        let info = meshca_pki::describe(set.chain[0].as_ref(), now).map_err(|e| e.to_string())?;
        let fresh = info.seconds_left as f64 > ttl.as_secs_f64() / 3.0;
        let bundle = state
            .authority
            .issuer()
            .trust_bundle()
            .await
            .map_err(|e| e.to_string())?;
        let held: Vec<Vec<u8>> = set.roots.iter().map(|r| r.as_ref().to_vec()).collect();
        let chain: Vec<Vec<u8>> = set.chain.iter().map(|c| c.as_ref().to_vec()).collect();
        // Still chaining to a root of the bundle, the serving certificate
        // stays: clients that do not hold a new root yet can still reach
        // the server (to fetch the new bundle, among others).
        let trusted = meshca_pki::verify_chain(&chain, &bundle, now).is_ok();
        let stale = state.server_cert_stale.swap(false, Ordering::SeqCst);
        if fresh && trusted && !stale && names.iter().all(|n| info.dns_names.contains(n)) {
            if held != bundle {
                // Only the roots the server accepts client certificates from
                // change; the reloader picks the file up.
                let pem: String = bundle
                    .iter()
                    .map(|d| meshca_pki::to_pem("CERTIFICATE", d))
                    .collect();
                meshca_files::write_atomic(
                    &out.join("ca.crt"),
                    pem.as_bytes(),
                    meshca_files::PUBLIC_MODE,
                )
                .map_err(|e| e.to_string())?;
                tracing::info!("the server now accepts clients of the new trust bundle");
            }
            return Ok(false);
        }
    }
    let req = IssueRequest::meshca_own("meshca")
        .map_err(|e| e.to_string())?
        .profile(Profile::Server)
        .ttl(Some(ttl))
        .dns(names)
        .ips(vec!["127.0.0.1".into(), "::1".into()])
        .generate_key(state.key_type);
    let issued = state
        .authority
        .issue(req)
        .await
        .map_err(|e| e.to_string())?;
    state.audit.record(
        "issue",
        "server",
        Some("meshca-system/meshca"),
        Some(&issued.record.serial.to_hex()),
        "allowed",
        Some("server certificate"),
    );
    meshca_files::create_private_dir(&out).map_err(|e| e.to_string())?;
    let key = issued.private_key.as_ref().ok_or("no key was generated")?;
    // The pair switches together; the reloader takes it once both are in place.
    meshca_files::write_set_atomic(
        &out,
        &[
            (
                "tls.key",
                key.to_pem().as_bytes(),
                meshca_files::SECRET_MODE,
            ),
            (
                "tls.crt",
                issued.certificate_pem.as_bytes(),
                meshca_files::PUBLIC_MODE,
            ),
            (
                "ca.crt",
                issued.ca_bundle_pem.as_bytes(),
                meshca_files::PUBLIC_MODE,
            ),
        ],
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(serial = %issued.record.serial, "issued the server's own certificate");
    Ok(true)
}

/// Makes the API accept client certificates of the issuer's current bundle
/// before returning (a rotation step: the next call may come with a
/// certificate of the new root). The serving certificate is left to
/// [`ensure_server_cert`] unless it no longer chains to the bundle.
pub async fn apply_bundle(state: &AppState) -> Result<(), String> {
    let bundle = state
        .authority
        .issuer()
        .trust_bundle()
        .await
        .map_err(|e| e.to_string())?;
    let dir = state.dir.join("server");
    let Ok(set) = meshca_tls::CertSet::load(&meshca_tls::CertPaths::in_dir(&dir)) else {
        return Ok(());
    };
    let held: Vec<Vec<u8>> = set.roots.iter().map(|r| r.as_ref().to_vec()).collect();
    let chain: Vec<Vec<u8>> = set.chain.iter().map(|c| c.as_ref().to_vec()).collect();
    if held == bundle
        || meshca_pki::verify_chain(&chain, &bundle, OffsetDateTime::now_utc()).is_err()
    {
        return Ok(());
    }
    let pem: String = bundle
        .iter()
        .map(|d| meshca_pki::to_pem("CERTIFICATE", d))
        .collect();
    meshca_files::write_atomic(
        &dir.join("ca.crt"),
        pem.as_bytes(),
        meshca_files::PUBLIC_MODE,
    )
    .map_err(|e| e.to_string())?;
    // The acceptor polls the files; wait for it to take them.
    let Some(acceptor) = state.tls.get() else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let now: Vec<Vec<u8>> = acceptor
            .current()
            .map(|s| s.roots.iter().map(|r| r.as_ref().to_vec()).collect())
            .unwrap_or_default();
        if now == bundle {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the API did not take the new trust bundle within 5s".into())
}

/// This replica's name: host and process, unique among live replicas.
fn replica_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "meshca".into());
    format!("{host}/{}", std::process::id())
}

/// How long after its expiry a join token is deleted by the leader's sweep.
pub const TOKEN_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The leader's scheduled work, once: deletes join tokens that expired more
/// than [`TOKEN_GRACE`] ago (as Kubernetes' token cleaner does), so the token
/// list does not grow forever. Returns how many went.
pub async fn sweep(state: &AppState) -> Result<usize, meshca_store::StoreError> {
    let cutoff = OffsetDateTime::now_utc() - TOKEN_GRACE;
    let mut gone = 0;
    for t in state.store.list_tokens().await? {
        if t.expires_at < cutoff {
            match state.store.delete_token(&t.id).await {
                Ok(()) => gone += 1,
                // Deleted meanwhile by an earlier leader: fine.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(gone)
}

/// How long records of expired certificates are kept by default.
pub const DEFAULT_KEEP_EXPIRED: Duration = Duration::from_secs(7 * 86_400);

/// How often the leader deletes records that expired over
/// [`AppState::keep_expired`] ago (and once when it starts).
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Records deleted per store call: each call is one short write, so that
/// a large backlog never holds up issuance for long.
const PRUNE_BATCH: usize = 1000;

/// How long the record of a superseded certificate (its identity has a
/// newer one: renewed, or issued again in a flood) is kept after it expired,
/// by default: the newest of each identity is kept for `keep_expired`.
pub const DEFAULT_KEEP_SUPERSEDED: Duration = Duration::from_secs(3600);

/// Deletes the records of certificates that expired over
/// [`AppState::keep_expired`] ago, and those of superseded ones that expired
/// over [`AppState::keep_superseded`] ago; returns how many.
pub async fn prune_expired(state: &AppState) -> Result<usize, meshca_store::StoreError> {
    let now = OffsetDateTime::now_utc();
    let rule = meshca_store::PruneRule {
        expired_before: now - state.keep_expired,
        // Never later than the other: a superseded record is kept no longer.
        superseded_expired_before: now - state.keep_superseded.min(state.keep_expired),
    };
    let mut gone = 0;
    loop {
        let n = state
            .store
            .delete_expired_certificates(&rule, PRUNE_BATCH)
            .await?;
        gone += n;
        if n < PRUNE_BATCH {
            return Ok(gone);
        }
    }
}

/// Starts what runs beside the API: following the event log, the leader
/// election, and the leader's scheduled work.
async fn start_background(state: &Arc<AppState>) -> Result<(), ServeError> {
    let st = state.clone();
    let reloader = state.clone();
    tokio::spawn(state.events.clone().follow(
        move |e| {
            // A revocation on any replica makes every replica's CRL stale; the
            // leader makes and shares the new one at once.
            if e.kind == "revoked" {
                if let Some(serial) = e.serial.as_deref().and_then(|s| s.parse().ok()) {
                    st.peers.mark_revoked(&serial);
                }
                st.invalidate_crl();
                if st.is_leader() {
                    let st = st.clone();
                    tokio::spawn(async move {
                        if let Err(e) = st.crl().await {
                            tracing::warn!("remaking the CRL failed: {e}");
                        }
                    });
                }
            }
        },
        // A rotation step on any replica: read the hierarchies again before
        // the event reaches this replica's agents.
        move || {
            let st = reloader.clone();
            async move {
                if let Err(e) = st.authority.issuer().reload().await {
                    tracing::warn!("reading the CA hierarchies again failed: {e}");
                }
            }
        },
    ));
    // Tell the other replicas which agents this one hears from (activation
    // of a root rotation counts them all).
    let st = state.clone();
    tokio::spawn(async move {
        let name = format!("agents/{}", st.replica);
        let mut last: Option<(Vec<(String, String)>, Instant)> = None;
        loop {
            let report = st.agents.export(OffsetDateTime::now_utc().unix_timestamp());
            let mut view: Vec<(String, String)> = report
                .agents
                .iter()
                .map(|a| (a.id.clone(), a.bundle.clone()))
                .collect();
            view.sort();
            // Written when it changed, and often enough to stay fresh.
            let due = last
                .as_ref()
                .is_none_or(|(v, at)| *v != view || at.elapsed() >= Duration::from_secs(15));
            if due && !(view.is_empty() && last.is_none()) {
                match serde_json::to_vec(&report) {
                    Ok(bytes) => match st.store.put_blob(&name, &bytes).await {
                        Ok(()) => last = Some((view, Instant::now())),
                        Err(e) => tracing::debug!("sharing this replica's agents: {e}"),
                    },
                    Err(e) => tracing::debug!("encoding this replica's agents: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let leadership = state
        .store
        .campaign(&state.replica)
        .await
        .map_err(|e| ServeError::Listen(format!("leader election: {e}")))?;
    let _ = state.leader.set(leadership);
    // The CRL is made now, not by the first caller that asks for it.
    let st = state.clone();
    tokio::spawn(async move {
        if let Err(e) = st.crls().await {
            tracing::warn!("making the CRL failed (will retry): {e}");
        }
    });
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            if !st.is_leader() {
                tokio::time::sleep(Duration::from_secs(10)).await;
                continue;
            }
            match prune_expired(&st).await {
                Ok(0) => {}
                Ok(n) => {
                    let done = format!(
                        "deleted {n} certificate record(s) expired over {} ago (over {} ago for those superseded by a newer one of their identity)",
                        meshca_pki::GoDuration(st.keep_expired),
                        meshca_pki::GoDuration(st.keep_superseded.min(st.keep_expired))
                    );
                    tracing::info!("{done}");
                    st.audit.record(
                        "prune-expired",
                        "scheduler",
                        None,
                        None,
                        "allowed",
                        Some(&done),
                    );
                }
                Err(e) => tracing::warn!("pruning expired records failed (will retry): {e}"),
            }
            tokio::time::sleep(PRUNE_EVERY).await;
        }
    });
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if !st.is_leader() {
                continue;
            }
            // An intermediate with a third of its life left is renewed
            // under the same root: it must never take the cluster down.
            let builtin = st.authority.issuer().kind() == "builtin";
            match meshca_issuer::rotation::renew_intermediate(
                &st.dir,
                &st.store,
                st.seal.as_ref(),
                &st.authority.policy().trust_domain,
                false,
            )
            .await
            {
                _ if !builtin => {}
                Ok(None) => {}
                Ok(Some(done)) => {
                    tracing::info!("{done}");
                    st.audit.record(
                        "renew-intermediate",
                        "scheduler",
                        None,
                        None,
                        "allowed",
                        Some(&done),
                    );
                    st.server_cert_stale.store(true, Ordering::SeqCst);
                    if let Err(e) = st.authority.issuer().reload().await {
                        tracing::error!("loading the renewed intermediate failed: {e}");
                    }
                    // Other replicas read the hierarchies again on this event.
                    st.events.publish("bundle-changed", None, None);
                }
                // Only when it is due and cannot be done (no root key):
                // said every minute until someone acts.
                Err(e) => tracing::error!("{e}"),
            }
            // Remade (and shared) well before its nextUpdate.
            if let Err(e) = st.crl().await {
                tracing::warn!("refreshing the CRL failed (will retry): {e}");
            }
            match sweep(&st).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("deleted {n} join tokens expired over a day ago"),
                Err(e) => tracing::warn!("token sweep failed (will retry): {e}"),
            }
        }
    });
    Ok(())
}

/// Runs the service until the process is stopped.
pub async fn run(opts: ServeOptions, state: Arc<AppState>) -> Result<(), ServeError> {
    start_background(&state).await?;
    ensure_server_cert(&state, &opts.dir, &opts.server_names)
        .await
        .map_err(ServeError::Certificate)?;
    let tls = TlsConfig {
        mode: TlsMode::Permissive,
        certs: Some(opts.dir.join("server")),
        ..Default::default()
    };
    let acceptor =
        Arc::new(TlsAcceptor::new(&tls).map_err(|e| ServeError::Certificate(e.to_string()))?);
    let _ = state.tls.set(acceptor.clone());
    // Renew the server's certificate well before it expires.
    let (renew_state, dir, names) = (state.clone(), opts.dir.clone(), opts.server_names.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Err(e) = ensure_server_cert(&renew_state, &dir, &names).await {
                tracing::error!("renewing the server's certificate failed (will retry): {e}");
            }
        }
    });
    // The trust bundle changed (a rotation step here or on another
    // replica, a new issuer in Vault): serve a certificate that chains to
    // it. A built-in rotation step announces itself where it is taken; an
    // upstream issuer's change is announced by the leader.
    if let Some(mut changes) = state.authority.issuer().bundle_changes() {
        let (st, dir, names) = (state.clone(), opts.dir.clone(), opts.server_names.clone());
        let upstream = state.authority.issuer().kind() != "builtin";
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                st.invalidate_crl();
                if upstream && st.is_leader() {
                    st.events.publish("bundle-changed", None, None);
                }
                if let Err(e) = ensure_server_cert(&st, &dir, &names).await {
                    tracing::error!(
                        "reissuing the server's certificate for the new bundle failed (will retry): {e}"
                    );
                }
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| ServeError::Listen(format!("cannot listen on {}: {e}", opts.listen)))?;
    let port = listener
        .local_addr()
        .map_err(|e| ServeError::Listen(e.to_string()))?
        .port();
    if let Some(addr) = opts.http_redirect {
        let plain = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Listen(format!("cannot listen on {addr}: {e}")))?;
        tokio::spawn(meshca_tls::serve_redirect_with(
            plain,
            port,
            // Out of the files the API's cap leaves: nothing is added.
            meshca_tls::ConnLimits::small(),
        ));
    }
    tracing::info!("meshca serving on https://{}", opts.listen);
    let limits = state.limits.connections().map_err(ServeError::Listen)?;
    meshca_tls::serve_with(listener, acceptor, router(state), limits)
        .await
        .map_err(|e| ServeError::Listen(e.to_string()))
}
