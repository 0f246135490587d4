//! A small etcd v3 client: key-value reads and writes, transactions, leases
//! and watches, over etcd's JSON gateway.
//!
//! # Design
//! etcd serves its v3 API twice on the client port: as gRPC and as JSON over
//! HTTP (`/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`, ...; the "gRPC gateway",
//! documented and on by default since etcd 3.4). The gRPC client crates need
//! `protoc` at build time, which meshca's build must not; the gateway needs
//! nothing but an HTTP client, and carries the same operations with the same
//! guarantees (the gateway is a thin translation in front of the same server).
//!
//! One [`Client`] holds a pool of keep-alive connections (reqwest on rustls)
//! and the list of endpoints. A request goes to the endpoint that answered
//! last; when the connection fails (refused, reset, closed) it moves on to
//! the next, so a dead member is skipped. A request that timed out is not
//! sent again (the cluster is slow or has no quorum): the caller gets
//! [`EtcdError::Unavailable`] at once and decides. With username/password the client authenticates, keeps the
//! token and authenticates again when etcd says the token expired.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), meshca_etcd::EtcdError> {
//! use meshca_etcd::{Client, Compare, EtcdConfig, Op, Txn};
//! let etcd = Client::new(EtcdConfig::new(vec!["127.0.0.1:2379".into()]))?;
//! // Create a key only if it does not exist.
//! let txn = Txn::new()
//!     .when(Compare::absent(b"/meshca/x"))
//!     .then(Op::put(b"/meshca/x", b"1", None));
//! let created = etcd.txn(&txn).await?.succeeded;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

/// How long one request may take by default: short, so that a caller hears
/// "unavailable" quickly instead of hanging while etcd has no quorum.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// What can go wrong talking to etcd.
#[derive(Debug)]
#[non_exhaustive]
pub enum EtcdError {
    /// The settings are unusable (endpoint, TLS files).
    Config(String),
    /// No endpoint answered in time, or etcd has no quorum.
    Unavailable {
        /// The endpoints tried.
        endpoints: String,
        /// What happened.
        reason: String,
    },
    /// etcd refused the request (authentication, permission, limits).
    Refused(String),
    /// A watch started at a revision etcd has compacted away.
    Compacted {
        /// The oldest revision still available.
        compact_revision: i64,
    },
    /// etcd's answer is not what its API promises.
    Protocol(String),
}

impl EtcdError {
    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EtcdError::Unavailable { .. })
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Config(m) => write!(f, "etcd settings: {m}"),
            EtcdError::Unavailable { endpoints, reason } => write!(
                f,
                "etcd ({endpoints}) is unavailable: {reason}; check that a majority of its members is up and reachable"
            ),
            EtcdError::Refused(m) => write!(f, "etcd refused the request: {m}"),
            EtcdError::Compacted { compact_revision } => write!(
                f,
                "etcd has compacted the history before revision {compact_revision}; start again from there"
            ),
            EtcdError::Protocol(m) => write!(f, "unexpected answer from etcd: {m}"),
        }
    }
}

impl std::error::Error for EtcdError {}

/// Client certificate and CA for TLS to etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA certificates (PEM) that etcd's serving certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), with `key`.
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
}

/// Username and password for etcd's authentication.
#[derive(Clone)]
pub struct EtcdUser {
    /// The user.
    pub name: String,
    /// The password.
    pub password: String,
}

impl fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"...")
            .finish()
    }
}

/// Where etcd is and how to talk to it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` of each member's client URL.
    pub endpoints: Vec<String>,
    /// TLS, when etcd serves https.
    pub tls: Option<EtcdTls>,
    /// Authentication, when etcd has it on.
    pub user: Option<EtcdUser>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl EtcdConfig {
    /// Plain http to `endpoints`, no authentication, the default timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            tls: None,
            user: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A key and its value as etcd holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the key's creation.
    pub create_revision: i64,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// True for a deletion (then `kv.value` is empty).
    pub deleted: bool,
    /// The key after the change.
    pub kv: KeyValue,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub struct Compare(Value);

impl Compare {
    /// The key does not exist.
    pub fn absent(key: &[u8]) -> Self {
        Compare(
            json!({"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}),
        )
    }

    /// The key was last changed at `revision` (0: it does not exist).
    pub fn mod_revision_is(key: &[u8], revision: i64) -> Self {
        Compare(
            json!({"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision.to_string()}),
        )
    }
}

/// An operation of a transaction.
#[derive(Debug, Clone)]
pub struct Op(Value);

impl Op {
    /// Sets `key` to `value`, attached to `lease` when given.
    pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Self {
        let mut put = json!({"key": b64(key), "value": b64(value)});
        if let Some(l) = lease {
            put["lease"] = json!(l.to_string());
        }
        Op(json!({ "request_put": put }))
    }

    /// Reads `key`.
    pub fn get(key: &[u8]) -> Self {
        Op(json!({"request_range": {"key": b64(key)}}))
    }

    /// Deletes `key`.
    pub fn delete(key: &[u8]) -> Self {
        Op(json!({"request_delete_range": {"key": b64(key)}}))
    }
}

/// An atomic if-then-else: when every comparison holds, the `then`
/// operations run, else the `otherwise` ones, all at one revision.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    compare: Vec<Value>,
    success: Vec<Value>,
    failure: Vec<Value>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }
    /// Adds a condition.
    pub fn when(mut self, c: Compare) -> Self {
        self.compare.push(c.0);
        self
    }
    /// Adds an operation run when the conditions hold.
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op.0);
        self
    }
    /// Adds an operation run when they do not.
    pub fn otherwise(mut self, op: Op) -> Self {
        self.failure.push(op.0);
        self
    }
    /// Number of operations on the success branch.
    pub fn len(&self) -> usize {
        self.success.len()
    }
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.success.is_empty() && self.failure.is_empty()
    }
}

/// The result of a transaction.
#[derive(Debug, Clone)]
pub struct TxnResponse {
    /// Whether the conditions held.
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// For each `get` of the branch that ran, the key if it exists.
    pub ranges: Vec<Option<KeyValue>>,
}

/// An etcd client. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    watch_http: reqwest::Client,
    bases: Vec<String>,
    current: AtomicUsize,
    user: Option<EtcdUser>,
    token: RwLock<Option<String>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("etcd::Client")
            .field("endpoints", &self.inner.bases)
            .finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(field: &str, v: Option<&Value>) -> Result<Vec<u8>, EtcdError> {
    match v.and_then(Value::as_str) {
        None => Ok(Vec::new()),
        Some(s) => B64
            .decode(s)
            .map_err(|e| EtcdError::Protocol(format!("{field} is not base64: {e}"))),
    }
}

/// The gateway writes int64 as strings and leaves out zero values.
fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_of(v: &Value) -> Result<KeyValue, EtcdError> {
    Ok(KeyValue {
        key: unb64("key", v.get("key"))?,
        value: unb64("value", v.get("value"))?,
        create_revision: int(v.get("create_revision")),
        mod_revision: int(v.get("mod_revision")),
        lease: int(v.get("lease")),
    })
}

fn kvs_of(v: &Value) -> Result<Vec<KeyValue>, EtcdError> {
    match v.get("kvs").and_then(Value::as_array) {
        None => Ok(Vec::new()),
        Some(a) => a.iter().map(kv_of).collect(),
    }
}

/// The key just after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

fn tls_config(tls: &EtcdTls) -> Result<rustls::ClientConfig, EtcdError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| EtcdError::Config(format!("{what} {}: {e}", p.display())))
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = tls.ca.as_ref().ok_or_else(|| {
        EtcdError::Config(
            "TLS to etcd needs the CA that signed etcd's certificate (--etcd-ca)".into(),
        )
    })?;
    let pem = read(ca, "--etcd-ca")?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| EtcdError::Config(format!("--etcd-ca {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| EtcdError::Config(format!("--etcd-ca {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(EtcdError::Config(format!(
            "--etcd-ca {}: no certificate in it",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdError::Config(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            let cert_pem = read(c, "--etcd-cert")?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EtcdError::Config(format!("--etcd-cert {}: {e}", c.display())))?;
            let key_pem = read(k, "--etcd-key")?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| EtcdError::Config(format!("--etcd-key {}: {e}", k.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| EtcdError::Config(format!("--etcd-cert/--etcd-key: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(EtcdError::Config(
            "give both --etcd-cert and --etcd-key, or neither".into(),
        )),
    }
}

const GRPC_DEADLINE_EXCEEDED: i64 = 4;
const GRPC_UNAVAILABLE: i64 = 14;
const GRPC_UNAUTHENTICATED: i64 = 16;

#[derive(Deserialize)]
struct GatewayError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

impl Client {
    /// A client for `config.endpoints`. Nothing is contacted yet.
    pub fn new(config: EtcdConfig) -> Result<Self, EtcdError> {
        if config.endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoint given".into()));
        }
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut bases = Vec::new();
        for e in &config.endpoints {
            if e.is_empty() || e.contains('/') || e.contains('@') {
                return Err(EtcdError::Config(format!(
                    "endpoint {e:?}: expected host:port"
                )));
            }
            bases.push(format!("{scheme}://{e}"));
        }
        let build = |timeout: Option<Duration>| -> Result<reqwest::Client, EtcdError> {
            let mut b = reqwest::Client::builder()
                .http1_only()
                .connect_timeout(config.timeout)
                .pool_idle_timeout(Duration::from_secs(60))
                .tcp_nodelay(true);
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            if let Some(tls) = &config.tls {
                b = b.tls_backend_preconfigured(tls_config(tls)?);
            }
            b.build()
                .map_err(|e| EtcdError::Config(format!("HTTP client: {e}")))
        };
        Ok(Client {
            inner: Arc::new(Inner {
                http: build(Some(config.timeout))?,
                // A watch stays open for as long as it is wanted.
                watch_http: build(None)?,
                bases,
                current: AtomicUsize::new(0),
                user: config.user,
                token: RwLock::new(None),
            }),
        })
    }

    /// The endpoints, for messages.
    pub fn endpoints(&self) -> String {
        self.inner.bases.join(",")
    }

    fn unavailable(&self, reason: impl fmt::Display) -> EtcdError {
        EtcdError::Unavailable {
            endpoints: self.endpoints(),
            reason: reason.to_string(),
        }
    }

    async fn authenticate(&self, base: &str) -> Result<Option<String>, EtcdError> {
        let Some(user) = &self.inner.user else {
            return Ok(None);
        };
        let resp = self
            .inner
            .http
            .post(format!("{base}/v3/auth/authenticate"))
            .json(&json!({"name": user.name, "password": user.password}))
            .send()
            .await
            .map_err(|e| self.unavailable(e))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| EtcdError::Protocol(format!("authenticate: {e}")))?;
        if !status.is_success() {
            return Err(EtcdError::Refused(format!(
                "authentication as {:?} failed: {}",
                user.name,
                body.get("message").and_then(Value::as_str).unwrap_or("")
            )));
        }
        let token = body
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| EtcdError::Protocol("authenticate: no token".into()))?
            .to_owned();
        if let Ok(mut t) = self.inner.token.write() {
            *t = Some(token.clone());
        }
        Ok(Some(token))
    }

    fn token(&self) -> Option<String> {
        self.inner.token.read().ok().and_then(|t| t.clone())
    }

    /// Sends one request: to the endpoint that answered last, then to the
    /// others when it cannot be connected.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.inner.bases.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last_err = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let base = &self.inner.bases[idx];
            match self.call_one(base, path, body).await {
                Ok(v) => {
                    if idx != start {
                        self.inner.current.store(idx, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(Failure::NotSent(e)) => last_err = Some(e),
                Err(Failure::Final(e)) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.unavailable("no endpoint")))
    }

    async fn call_one(&self, base: &str, path: &str, body: &Value) -> Result<Value, Failure> {
        let mut token = self.token();
        if token.is_none() && self.inner.user.is_some() {
            token = self.authenticate(base).await.map_err(Failure::from_auth)?;
        }
        for attempt in 0..2 {
            let mut req = self.inner.http.post(format!("{base}{path}")).json(body);
            if let Some(t) = &token {
                req = req.header("Authorization", t);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                // A timeout: the cluster is slow or has no quorum; sending
                // the same request elsewhere would only add load.
                Err(e) if e.is_timeout() => {
                    return Err(Failure::Final(
                        self.unavailable(format!("{base}: {}", error_chain(&e))),
                    ));
                }
                // Refused, reset, closed (a member went away): another member
                // may take it. Every write meshca sends is a compare-and-swap
                // or a put of the same value, so a second delivery of one
                // that did land changes nothing.
                Err(e) => {
                    return Err(Failure::NotSent(
                        self.unavailable(format!("{base}: {}", error_chain(&e))),
                    ));
                }
            };
            let status = resp.status();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| Failure::Final(self.unavailable(format!("{base}: {e}"))))?;
            if status.is_success() {
                return serde_json::from_slice(&bytes)
                    .map_err(|e| Failure::Final(EtcdError::Protocol(format!("{path}: {e}"))));
            }
            let err: GatewayError = serde_json::from_slice(&bytes).unwrap_or(GatewayError {
                code: 0,
                error: String::new(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
            let message = if err.message.is_empty() {
                err.error
            } else {
                err.message
            };
            // The gateway carries etcd's gRPC status code.
            if attempt == 0 && self.inner.user.is_some() && err.code == GRPC_UNAUTHENTICATED {
                token = self.authenticate(base).await.map_err(Failure::from_auth)?;
                continue;
            }
            // No leader, request timed out, member stopping: another member
            // (or a later try) may serve it.
            if err.code == GRPC_UNAVAILABLE
                || err.code == GRPC_DEADLINE_EXCEEDED
                || status.as_u16() >= 500 && err.code == 0
            {
                return Err(Failure::NotSent(
                    self.unavailable(format!("{base}: {message}")),
                ));
            }
            return Err(Failure::Final(EtcdError::Refused(format!(
                "{path}: {message}"
            ))));
        }
        Err(Failure::Final(EtcdError::Refused(
            "authentication keeps failing".into(),
        )))
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let v = self.call("/v3/kv/range", &json!({"key": b64(key)})).await?;
        Ok(kvs_of(&v)?.into_iter().next())
    }

    /// Every key starting with `prefix`, in key order, read page by page
    /// at one revision (a consistent snapshot).
    pub async fn get_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, EtcdError> {
        Ok(self.get_prefix_at(prefix).await?.0)
    }

    /// Like [`Client::get_prefix`], with the revision the snapshot was read
    /// at: a watch from that revision + 1 misses nothing.
    pub async fn get_prefix_at(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        const PAGE: i64 = 1000;
        let end = b64(&prefix_end(prefix));
        let mut out = Vec::new();
        let mut from = prefix.to_vec();
        let mut revision = 0i64;
        loop {
            let mut req = json!({"key": b64(&from), "range_end": end, "limit": PAGE.to_string()});
            if revision > 0 {
                req["revision"] = json!(revision.to_string());
            }
            let v = self.call("/v3/kv/range", &req).await?;
            if revision == 0 {
                revision = int(v.get("header").and_then(|h| h.get("revision")));
            }
            let kvs = kvs_of(&v)?;
            let more = v.get("more").and_then(Value::as_bool).unwrap_or(false);
            if let Some(last) = kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            out.extend(kvs);
            if !more {
                return Ok((out, revision));
            }
        }
    }

    /// Sets `key`; returns the new revision.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<i64, EtcdError> {
        let Op(put) = Op::put(key, value, lease);
        let v = self.call("/v3/kv/put", &put["request_put"]).await?;
        Ok(int(v.get("header").and_then(|h| h.get("revision"))))
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/kv/deleterange", &json!({"key": b64(key)}))
            .await?;
        Ok(int(v.get("deleted")))
    }

    /// Runs a transaction.
    pub async fn txn(&self, txn: &Txn) -> Result<TxnResponse, EtcdError> {
        let v = self
            .call(
                "/v3/kv/txn",
                &json!({"compare": txn.compare, "success": txn.success, "failure": txn.failure}),
            )
            .await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let mut ranges = Vec::new();
        if let Some(responses) = v.get("responses").and_then(Value::as_array) {
            for r in responses {
                if let Some(range) = r.get("response_range") {
                    ranges.push(kvs_of(range)?.into_iter().next());
                }
            }
        }
        Ok(TxnResponse {
            succeeded,
            revision: int(v.get("header").and_then(|h| h.get("revision"))),
            ranges,
        })
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", &json!({"TTL": ttl.to_string()}))
            .await?;
        match int(v.get("ID")) {
            0 => Err(EtcdError::Protocol(format!(
                "lease grant: no lease id ({})",
                v.get("error").and_then(Value::as_str).unwrap_or("")
            ))),
            id => Ok(id),
        }
    }

    /// Renews a lease; returns its new TTL, 0 when it has already expired.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({"ID": id.to_string()}))
            .await?;
        Ok(int(v.get("result").and_then(|r| r.get("TTL"))))
    }

    /// Ends a lease now; its keys are deleted.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .await
            .map(|_| ())
    }

    /// Asks a member for its status: a cheap liveness check that also needs
    /// the member to know the cluster's leader.
    pub async fn status(&self) -> Result<(), EtcdError> {
        let v = self.call("/v3/maintenance/status", &json!({})).await?;
        // A member id is a uint64, written as a string; absent or "0": none.
        let leader = match v.get("leader") {
            Some(Value::String(s)) => s != "0" && !s.is_empty(),
            Some(Value::Number(n)) => n.as_u64().is_some_and(|n| n != 0),
            _ => false,
        };
        if !leader {
            return Err(self.unavailable("the cluster has no leader"));
        }
        Ok(())
    }

    /// Watches every key under `prefix`, from `start_revision` (0: from now).
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<WatchStream, EtcdError> {
        let mut create = json!({"key": b64(prefix), "range_end": b64(&prefix_end(prefix))});
        if start_revision > 0 {
            create["start_revision"] = json!(start_revision.to_string());
        }
        let body = json!({ "create_request": create });
        let n = self.inner.bases.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let base = &self.inner.bases[(start + i) % n];
            let mut req = self
                .inner
                .watch_http
                .post(format!("{base}/v3/watch"))
                .json(&body);
            let mut token = self.token();
            if token.is_none() && self.inner.user.is_some() {
                token = self.authenticate(base).await?;
            }
            if let Some(t) = &token {
                req = req.header("Authorization", t);
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    return Ok(WatchStream {
                        body: Box::pin(resp.bytes_stream()),
                        buf: BytesMut::new(),
                        endpoint: base.clone(),
                    });
                }
                Ok(resp) => {
                    last =
                        Some(self.unavailable(format!("{base}: watch answered {}", resp.status())))
                }
                Err(e) => last = Some(self.unavailable(format!("{base}: {e}"))),
            }
        }
        Err(last.unwrap_or_else(|| self.unavailable("no endpoint")))
    }
}

enum Failure {
    /// Not delivered (or refused before being applied): another member may take it.
    NotSent(EtcdError),
    /// Delivered, or refused for good: do not send again.
    Final(EtcdError),
}

impl Failure {
    fn from_auth(e: EtcdError) -> Self {
        if e.is_unavailable() {
            Failure::NotSent(e)
        } else {
            Failure::Final(e)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// The changes under a watched prefix, batch by batch, in revision order.
pub struct WatchStream {
    body: ByteStream,
    buf: BytesMut,
    endpoint: String,
}

impl fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchStream")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl WatchStream {
    /// The next batch of changes; `None` when the stream ended (the member
    /// went away: watch again from the last revision seen + 1).
    pub async fn next(&mut self) -> Option<Result<Vec<WatchEvent>, EtcdError>> {
        loop {
            // The gateway writes one JSON message per line.
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..pos];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match parse_watch_message(line) {
                    Ok(Some(events)) if !events.is_empty() => return Some(Ok(events)),
                    Ok(_) => continue,
                    Err(e) => return Some(Err(e)),
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(chunk.chunk()),
                Some(Err(e)) => {
                    return Some(Err(EtcdError::Unavailable {
                        endpoints: self.endpoint.clone(),
                        reason: format!("watch broke: {e}"),
                    }));
                }
                None => {
                    if self.buf.is_empty() {
                        return None;
                    }
                    let rest = self.buf.split();
                    return match parse_watch_message(&rest) {
                        Ok(Some(events)) if !events.is_empty() => Some(Ok(events)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    };
                }
            }
        }
    }
}

/// One message of the watch stream: `Some(events)` for changes (maybe none,
/// for the "created" and progress messages), an error for a cancelled watch.
fn parse_watch_message(line: &[u8]) -> Result<Option<Vec<WatchEvent>>, EtcdError> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| EtcdError::Protocol(format!("watch message: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(EtcdError::Unavailable {
            endpoints: String::new(),
            reason: format!("watch ended: {err}"),
        });
    }
    let r = v
        .get("result")
        .ok_or_else(|| EtcdError::Protocol("watch message without result".into()))?;
    let compact = int(r.get("compact_revision"));
    if compact > 0 {
        return Err(EtcdError::Compacted {
            compact_revision: compact,
        });
    }
    if r.get("canceled").and_then(Value::as_bool).unwrap_or(false) {
        return Err(EtcdError::Refused(format!(
            "watch cancelled: {}",
            r.get("cancel_reason").and_then(Value::as_str).unwrap_or("")
        )));
    }
    let mut out = Vec::new();
    if let Some(events) = r.get("events").and_then(Value::as_array) {
        for e in events {
            let kv = e
                .get("kv")
                .ok_or_else(|| EtcdError::Protocol("watch event without kv".into()))?;
            out.push(WatchEvent {
                deleted: e.get("type").and_then(Value::as_str) == Some("DELETE"),
                kv: kv_of(kv)?,
            });
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/meshca/"), b"/meshca0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn watch_messages_parse() {
        let created = br#"{"result":{"header":{"revision":"2"},"created":true}}"#;
        assert_eq!(parse_watch_message(created).ok().flatten(), Some(vec![]));
        let put = br#"{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"2","value":"YmFy"}}]}}"#;
        let events = parse_watch_message(put).ok().flatten().unwrap_or_default();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kv.key, b"foo");
        assert_eq!(events[0].kv.value, b"bar");
        assert_eq!(events[0].kv.mod_revision, 3);
        assert!(!events[0].deleted);
        let del =
            br#"{"result":{"events":[{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"4"}}]}}"#;
        let events = parse_watch_message(del).ok().flatten().unwrap_or_default();
        assert!(events[0].deleted);
        let compacted = br#"{"result":{"compact_revision":"7","canceled":true}}"#;
        assert!(matches!(
            parse_watch_message(compacted),
            Err(EtcdError::Compacted {
                compact_revision: 7
            })
        ));
        assert!(parse_watch_message(b"not json").is_err());
    }

    #[test]
    fn endpoints_are_host_port() {
        assert!(Client::new(EtcdConfig::new(vec![])).is_err());
        assert!(Client::new(EtcdConfig::new(vec!["http://x:1".into()])).is_err());
        assert!(Client::new(EtcdConfig::new(vec!["127.0.0.1:2379".into()])).is_ok());
    }

    #[test]
    fn passwords_stay_out_of_debug() {
        let u = EtcdUser {
            name: "meshca".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
