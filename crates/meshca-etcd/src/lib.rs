//! A small etcd v3 client: key-value reads and writes, transactions, leases
//! and watches, over etcd's gRPC API.
//!
//! # Design
//! The protobuf code is generated at build time from the vendored `.proto`
//! files by protox, a protobuf compiler written in Rust, so the build needs
//! nothing but the Rust toolchain (the usual Rust etcd clients need `protoc`).
//! An earlier version spoke etcd's JSON gateway instead; the gateway decodes
//! JSON and base64 and then forwards each request to etcd's own gRPC server,
//! so every request was parsed twice and etcd spent most of its CPU on it.
//!
//! One [`Client`] holds one lazily connected gRPC channel (HTTP/2, many
//! requests multiplexed) per endpoint. A request goes to the endpoint that
//! answered last; when it is unavailable (refused, reset, no leader) the
//! next one is tried, so a dead member is skipped; so is one that does not
//! answer within the timeout (a killed member's connection can hang rather
//! than fail). meshca's writes are compare-and-swaps and puts under fresh
//! keys, so a second delivery of one that did land is harmless (see the
//! README: at worst a record nobody was given, or an event told twice).
//! When no member answers, the caller gets [`EtcdError::Unavailable`]. With username/password
//! the client authenticates, keeps the token and authenticates again when
//! etcd says the token expired.
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
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

#[allow(
    dead_code,
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used
)]
mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb as rpc;
use pb::etcdserverpb::auth_client::AuthClient;
use pb::etcdserverpb::kv_client::KvClient;
use pb::etcdserverpb::lease_client::LeaseClient;
use pb::etcdserverpb::maintenance_client::MaintenanceClient;
use pb::etcdserverpb::watch_client::WatchClient;

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

impl From<pb::mvccpb::KeyValue> for KeyValue {
    fn from(kv: pb::mvccpb::KeyValue) -> Self {
        KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
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
pub struct Compare(rpc::Compare);

impl Compare {
    /// The key does not exist.
    pub fn absent(key: &[u8]) -> Self {
        Compare(rpc::Compare {
            result: rpc::compare::CompareResult::Equal as i32,
            target: rpc::compare::CompareTarget::Create as i32,
            key: key.to_vec(),
            range_end: Vec::new(),
            target_union: Some(rpc::compare::TargetUnion::CreateRevision(0)),
        })
    }

    /// The key was last changed at `revision` (0: it does not exist).
    pub fn mod_revision_is(key: &[u8], revision: i64) -> Self {
        Compare(rpc::Compare {
            result: rpc::compare::CompareResult::Equal as i32,
            target: rpc::compare::CompareTarget::Mod as i32,
            key: key.to_vec(),
            range_end: Vec::new(),
            target_union: Some(rpc::compare::TargetUnion::ModRevision(revision)),
        })
    }
}

/// An operation of a transaction.
#[derive(Debug, Clone)]
pub struct Op(rpc::RequestOp);

impl Op {
    /// Sets `key` to `value`, attached to `lease` when given.
    pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Self {
        Op(rpc::RequestOp {
            request: Some(rpc::request_op::Request::RequestPut(put_request(
                key, value, lease,
            ))),
        })
    }

    /// Deletes `key` (nothing when it does not exist).
    pub fn delete(key: &[u8]) -> Self {
        Op(rpc::RequestOp {
            request: Some(rpc::request_op::Request::RequestDeleteRange(
                rpc::DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                },
            )),
        })
    }

    /// Reads `key`.
    pub fn get(key: &[u8]) -> Self {
        Op(rpc::RequestOp {
            request: Some(rpc::request_op::Request::RequestRange(rpc::RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })),
        })
    }
}

fn put_request(key: &[u8], value: &[u8], lease: Option<i64>) -> rpc::PutRequest {
    rpc::PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease: lease.unwrap_or(0),
        ..Default::default()
    }
}

/// An atomic if-then-else: when every comparison holds, the `then`
/// operations run, else the `otherwise` ones, all at one revision.
#[derive(Debug, Clone, Default)]
pub struct Txn(rpc::TxnRequest);

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }
    /// Adds a condition.
    pub fn when(mut self, c: Compare) -> Self {
        self.0.compare.push(c.0);
        self
    }
    /// Adds an operation run when the conditions hold.
    pub fn then(mut self, op: Op) -> Self {
        self.0.success.push(op.0);
        self
    }
    /// Adds an operation run when they do not.
    pub fn otherwise(mut self, op: Op) -> Self {
        self.0.failure.push(op.0);
        self
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
    channels: Vec<Channel>,
    names: Vec<String>,
    current: AtomicUsize,
    timeout: Duration,
    user: Option<EtcdUser>,
    token: RwLock<Option<String>>,
    tls: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("etcd::Client")
            .field("endpoints", &self.inner.names)
            .finish_non_exhaustive()
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

fn tls_config(tls: &EtcdTls) -> Result<ClientTlsConfig, EtcdError> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| EtcdError::Config(format!("{what} {}: {e}", p.display())))
    };
    let ca = tls.ca.as_ref().ok_or_else(|| {
        EtcdError::Config(
            "TLS to etcd needs the CA that signed etcd's certificate (--etcd-ca)".into(),
        )
    })?;
    let ca_pem = read(ca, "--etcd-ca")?;
    if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(EtcdError::Config(format!(
            "--etcd-ca {}: no PEM certificate in it",
            ca.display()
        )));
    }
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            config = config.identity(Identity::from_pem(
                read(c, "--etcd-cert")?,
                read(k, "--etcd-key")?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Config(
                "give both --etcd-cert and --etcd-key, or neither".into(),
            ));
        }
    }
    Ok(config)
}

/// How long one member gets to answer: with several, a share of the
/// timeout, so that when one hangs (a member that died with a request of
/// ours, or lost its leader) the others are asked within the timeout.
fn attempt_timeout(config: &EtcdConfig) -> Duration {
    let n = u32::try_from(config.endpoints.len().max(1)).unwrap_or(1);
    (config.timeout / n)
        .max(Duration::from_millis(500))
        .min(config.timeout)
}

/// Whether another member (or a later try) may serve what failed with `s`.
fn retryable(s: &Status) -> bool {
    // Unavailable: refused, no leader, member stopping; etcd also says
    // "request timed out" this way. A transport error: the connection to
    // that member broke (killed, reset).
    s.code() == Code::Unavailable || is_transport(s)
}

/// Whether the connection, not etcd, failed.
fn is_transport(s: &Status) -> bool {
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        src = e.source();
    }
    false
}

fn describe(s: &Status) -> String {
    let mut text = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_owned()
    };
    let mut src = std::error::Error::source(s);
    while let Some(inner) = src {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        src = inner.source();
    }
    text
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
        let tls = config.tls.as_ref().map(tls_config).transpose()?;
        let mut channels = Vec::new();
        let mut names = Vec::new();
        for e in &config.endpoints {
            if e.is_empty() || e.contains('/') || e.contains('@') {
                return Err(EtcdError::Config(format!(
                    "endpoint {e:?}: expected host:port"
                )));
            }
            let url = format!("{scheme}://{e}");
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|err| EtcdError::Config(format!("endpoint {e:?}: {err}")))?
                .connect_timeout(attempt_timeout(&config))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(config.timeout);
            if let Some(t) = &tls {
                endpoint = endpoint
                    .tls_config(t.clone())
                    .map_err(|err| EtcdError::Config(format!("TLS to {e}: {err}")))?;
            }
            channels.push(endpoint.connect_lazy());
            names.push(url);
        }
        Ok(Client {
            inner: Arc::new(Inner {
                channels,
                names,
                current: AtomicUsize::new(0),
                timeout: attempt_timeout(&config),
                user: config.user,
                token: RwLock::new(None),
                tls: config.tls.is_some(),
            }),
        })
    }

    /// The endpoints, for messages.
    pub fn endpoints(&self) -> String {
        self.inner.names.join(",")
    }

    fn unavailable(&self, reason: impl fmt::Display) -> EtcdError {
        EtcdError::Unavailable {
            endpoints: self.endpoints(),
            reason: reason.to_string(),
        }
    }

    fn token(&self) -> Option<String> {
        self.inner.token.read().ok().and_then(|t| t.clone())
    }

    async fn authenticate(&self, channel: Channel) -> Result<Option<String>, Status> {
        let Some(user) = &self.inner.user else {
            return Ok(None);
        };
        let mut req = Request::new(rpc::AuthenticateRequest {
            name: user.name.clone(),
            password: user.password.clone(),
        });
        req.set_timeout(self.inner.timeout);
        let token = AuthClient::new(channel)
            .authenticate(req)
            .await?
            .into_inner()
            .token;
        if let Ok(mut t) = self.inner.token.write() {
            *t = Some(token.clone());
        }
        Ok(Some(token))
    }

    /// A request carrying the timeout and, with authentication on, the token.
    fn request<T>(&self, body: T, token: &Option<String>, timeout: bool) -> Request<T> {
        let mut req = Request::new(body);
        if timeout {
            req.set_timeout(self.inner.timeout);
        }
        if let Some(t) = token
            && let Ok(v) = t.parse()
        {
            req.metadata_mut().insert("token", v);
        }
        req
    }

    /// Runs `f` on the endpoint that answered last, then on the others while
    /// the failure says another member may serve it.
    async fn call<T, F, Fut>(&self, timeout: bool, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel, Option<String>, bool) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.inner.channels.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let channel = self.inner.channels[idx].clone();
            let mut token = self.token();
            if token.is_none() && self.inner.user.is_some() {
                match self.authenticate(channel.clone()).await {
                    Ok(t) => token = t,
                    Err(s) if retryable(&s) => {
                        last = Some(s);
                        continue;
                    }
                    Err(s) => return Err(self.refused(&s)),
                }
            }
            let mut result = f(channel.clone(), token, timeout).await;
            if let Err(s) = &result
                && s.code() == Code::Unauthenticated
                && self.inner.user.is_some()
            {
                // The token expired: once more with a fresh one.
                let token = self
                    .authenticate(channel.clone())
                    .await
                    .map_err(|s| self.refused(&s))?;
                result = f(channel, token, timeout).await;
            }
            match result {
                Ok(v) => {
                    if idx != start {
                        self.inner.current.store(idx, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                // No answer in time: this member may be gone with its
                // connection still pending (a killed process, a cut
                // network), so the next one is asked. If the request did
                // land, sending it again is harmless for meshca's writes
                // (compare-and-swaps, puts under fresh keys).
                Err(s) if s.code() == Code::DeadlineExceeded || s.code() == Code::Cancelled => {
                    tracing::debug!(endpoint = %self.inner.names[idx], "etcd: no answer in time");
                    last = Some(Status::deadline_exceeded(format!(
                        "{}: no answer within {:?}{}",
                        self.inner.names[idx],
                        self.inner.timeout,
                        self.https_hint()
                    )));
                }
                Err(s) if retryable(&s) => {
                    tracing::debug!(endpoint = %self.inner.names[idx], "etcd: {}", describe(&s));
                    last = Some(s);
                }
                Err(s) => return Err(self.refused(&s)),
            }
        }
        Err(match last {
            Some(s) if is_transport(&s) => {
                self.unavailable(format!("{}{}", describe(&s), self.https_hint()))
            }
            Some(s) => self.unavailable(describe(&s)),
            None => self.unavailable("no endpoint"),
        })
    }

    fn refused(&self, s: &Status) -> EtcdError {
        match s.code() {
            _ if is_transport(s) => {
                self.unavailable(format!("{}{}", describe(s), self.https_hint()))
            }
            Code::Unavailable | Code::DeadlineExceeded => self.unavailable(describe(s)),
            _ => EtcdError::Refused(describe(s)),
        }
    }

    /// Plain http to a member that serves https fails at the connection.
    fn https_hint(&self) -> &'static str {
        if self.inner.tls {
            ""
        } else {
            " (if etcd serves https, give --etcd-ca and, if it asks for one, a client certificate)"
        }
    }

    async fn range(&self, req: rpc::RangeRequest) -> Result<rpc::RangeResponse, EtcdError> {
        self.call(true, |ch, tok, t| {
            let req = self.request(req.clone(), &tok, t);
            async move { Ok(KvClient::new(ch).range(req).await?.into_inner()) }
        })
        .await
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let r = self
            .range(rpc::RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(r.kvs.into_iter().next().map(KeyValue::from))
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
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        let mut from = prefix.to_vec();
        let mut revision = 0i64;
        loop {
            let r = self
                .range(rpc::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE,
                    revision,
                    ..Default::default()
                })
                .await?;
            if revision == 0 {
                revision = r.header.as_ref().map_or(0, |h| h.revision);
            }
            if let Some(last) = r.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            out.extend(r.kvs.into_iter().map(KeyValue::from));
            if !r.more {
                return Ok((out, revision));
            }
        }
    }

    /// Up to `limit` keys starting with `prefix` and strictly after `after`
    /// (`None`: from the prefix on), in key order, and whether more such
    /// keys follow (etcd's `more`). One page of a listing walked with a
    /// cursor: each call is one range read at the current revision, so
    /// pages are not one snapshot.
    pub async fn get_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: i64,
    ) -> Result<(Vec<KeyValue>, bool), EtcdError> {
        let end = prefix_end(prefix);
        // The first key after `after` is `after` + 0x00; a cursor before
        // the prefix (not one of its keys) starts at the prefix.
        let from = match after {
            Some(after) if after >= prefix => {
                let mut from = after.to_vec();
                from.push(0);
                from
            }
            _ => prefix.to_vec(),
        };
        // A cursor past the prefix: nothing follows. (An end of `[0]` is
        // etcd's "to the end of the key space", never passed.)
        if end != [0] && from >= end {
            return Ok((Vec::new(), false));
        }
        let r = self
            .range(rpc::RangeRequest {
                key: from,
                range_end: end,
                limit: limit.max(1),
                ..Default::default()
            })
            .await?;
        let more = r.more;
        Ok((r.kvs.into_iter().map(KeyValue::from).collect(), more))
    }

    /// Sets `key`; returns the new revision.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<i64, EtcdError> {
        let body = put_request(key, value, lease);
        let r = self
            .call(true, |ch, tok, t| {
                let req = self.request(body.clone(), &tok, t);
                async move { Ok(KvClient::new(ch).put(req).await?.into_inner()) }
            })
            .await?;
        Ok(r.header.map_or(0, |h| h.revision))
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let body = rpc::DeleteRangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let r = self
            .call(true, |ch, tok, t| {
                let req = self.request(body.clone(), &tok, t);
                async move { Ok(KvClient::new(ch).delete_range(req).await?.into_inner()) }
            })
            .await?;
        Ok(r.deleted)
    }

    /// Runs a transaction.
    pub async fn txn(&self, txn: &Txn) -> Result<TxnResponse, EtcdError> {
        let r = self
            .call(true, |ch, tok, t| {
                let req = self.request(txn.0.clone(), &tok, t);
                async move { Ok(KvClient::new(ch).txn(req).await?.into_inner()) }
            })
            .await?;
        let mut ranges = Vec::new();
        for resp in r.responses {
            if let Some(rpc::response_op::Response::ResponseRange(range)) = resp.response {
                ranges.push(range.kvs.into_iter().next().map(KeyValue::from));
            }
        }
        Ok(TxnResponse {
            succeeded: r.succeeded,
            revision: r.header.map_or(0, |h| h.revision),
            ranges,
        })
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let body = rpc::LeaseGrantRequest { ttl, id: 0 };
        let r = self
            .call(true, |ch, tok, t| {
                let req = self.request(body, &tok, t);
                async move { Ok(LeaseClient::new(ch).lease_grant(req).await?.into_inner()) }
            })
            .await?;
        if r.id == 0 {
            return Err(EtcdError::Protocol(format!(
                "lease grant: no lease id ({})",
                r.error
            )));
        }
        Ok(r.id)
    }

    /// Renews a lease; returns its new TTL, 0 when it has already expired.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let timeout = self.inner.timeout;
        self.call(false, |ch, tok, _| {
            let req = self.request(
                tokio_stream::once(rpc::LeaseKeepAliveRequest { id }),
                &tok,
                false,
            );
            async move {
                let mut answers = LeaseClient::new(ch)
                    .lease_keep_alive(req)
                    .await?
                    .into_inner();
                match tokio::time::timeout(timeout, answers.message()).await {
                    Ok(Ok(Some(r))) => Ok(r.ttl),
                    Ok(Ok(None)) => Ok(0),
                    Ok(Err(s)) => Err(s),
                    Err(_) => Err(Status::deadline_exceeded("lease keep-alive")),
                }
            }
        })
        .await
    }

    /// Ends a lease now; its keys are deleted.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call(true, |ch, tok, t| {
            let req = self.request(rpc::LeaseRevokeRequest { id }, &tok, t);
            async move {
                LeaseClient::new(ch).lease_revoke(req).await?;
                Ok(())
            }
        })
        .await
    }

    /// Asks a member for its status: a cheap liveness check that also needs
    /// the member to know the cluster's leader.
    pub async fn status(&self) -> Result<(), EtcdError> {
        let r = self
            .call(true, |ch, tok, t| {
                let req = self.request(rpc::StatusRequest {}, &tok, t);
                async move { Ok(MaintenanceClient::new(ch).status(req).await?.into_inner()) }
            })
            .await?;
        if r.leader == 0 {
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
        let create = rpc::WatchRequest {
            request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
                rpc::WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        let endpoints = self.endpoints();
        self.call(false, |ch, tok, _| {
            // The request stream stays open: closing it would end the watch.
            let requests = futures_util::stream::once(futures_util::future::ready(create.clone()))
                .chain(futures_util::stream::pending());
            let req = self.request(requests, &tok, false);
            let endpoints = endpoints.clone();
            async move {
                let answers = WatchClient::new(ch).watch(req).await?.into_inner();
                Ok(WatchStream { answers, endpoints })
            }
        })
        .await
    }
}

/// The changes under a watched prefix, batch by batch, in revision order.
pub struct WatchStream {
    answers: tonic::Streaming<rpc::WatchResponse>,
    endpoints: String,
}

impl fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchStream")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl WatchStream {
    /// The next batch of changes; `None` when the stream ended (the member
    /// went away: watch again from the last revision seen + 1).
    pub async fn next(&mut self) -> Option<Result<Vec<WatchEvent>, EtcdError>> {
        loop {
            let r = match self.answers.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return None,
                Err(s) => {
                    return Some(Err(EtcdError::Unavailable {
                        endpoints: self.endpoints.clone(),
                        reason: format!("watch broke: {}", describe(&s)),
                    }));
                }
            };
            match watch_events(r) {
                Ok(events) if events.is_empty() => continue,
                other => return Some(other),
            }
        }
    }
}

/// The changes of one watch answer (none for the "created" and progress
/// answers); an error for a cancelled or compacted watch.
fn watch_events(r: rpc::WatchResponse) -> Result<Vec<WatchEvent>, EtcdError> {
    if r.compact_revision > 0 {
        return Err(EtcdError::Compacted {
            compact_revision: r.compact_revision,
        });
    }
    if r.canceled {
        return Err(EtcdError::Refused(format!(
            "watch cancelled: {}",
            r.cancel_reason
        )));
    }
    Ok(r.events
        .into_iter()
        .filter_map(|e| {
            let deleted = e.r#type == pb::mvccpb::event::EventType::Delete as i32;
            e.kv.map(|kv| WatchEvent {
                deleted,
                kv: kv.into(),
            })
        })
        .collect())
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
    fn watch_answers_become_events() {
        let kv = |k: &[u8], rev| pb::mvccpb::KeyValue {
            key: k.to_vec(),
            value: b"bar".to_vec(),
            mod_revision: rev,
            ..Default::default()
        };
        let created = rpc::WatchResponse {
            created: true,
            ..Default::default()
        };
        assert_eq!(watch_events(created).ok(), Some(vec![]));
        let put = rpc::WatchResponse {
            events: vec![
                pb::mvccpb::Event {
                    r#type: pb::mvccpb::event::EventType::Put as i32,
                    kv: Some(kv(b"foo", 3)),
                    prev_kv: None,
                },
                pb::mvccpb::Event {
                    r#type: pb::mvccpb::event::EventType::Delete as i32,
                    kv: Some(kv(b"foo", 4)),
                    prev_kv: None,
                },
            ],
            ..Default::default()
        };
        let events = watch_events(put).unwrap_or_default();
        assert_eq!(events.len(), 2);
        assert_eq!(
            (events[0].kv.key.as_slice(), events[0].kv.mod_revision),
            (&b"foo"[..], 3)
        );
        assert!(!events[0].deleted && events[1].deleted);
        let compacted = rpc::WatchResponse {
            compact_revision: 7,
            canceled: true,
            ..Default::default()
        };
        assert!(matches!(
            watch_events(compacted),
            Err(EtcdError::Compacted {
                compact_revision: 7
            })
        ));
    }

    #[tokio::test]
    async fn endpoints_are_host_port() {
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
