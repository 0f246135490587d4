//! mTLS in front of services that cannot change, and plaintext clients to
//! mTLS services: `meshca proxy`.
//!
//! # Design
//! A [`ProxyConfig`] holds routes. A **server** route accepts TCP, runs the
//! TLS handshake through [`meshca_tls::TlsAcceptor`] (mode `mtls`, or
//! `permissive` for migration), where the client's certificate is verified
//! against the bundle and its identity against the route's allow-list
//! *inside* the handshake, so a refused peer gets a TLS alert and never a
//! byte of the target; then it connects the target (TCP or Unix socket),
//! optionally writes a PROXY protocol v2 header carrying the verified
//! identity ([`proxy_v2`]), and moves bytes. A **client** route accepts
//! plaintext from local programs and originates mTLS through
//! [`meshca_tls::TlsConnector`], which checks the server's SPIFFE ID or DNS
//! name. Both reload the certificate directory (the agent's output) when it
//! changes: new handshakes take the new files, open connections keep theirs.
//!
//! Bytes move both ways with one 64 KiB buffer per direction: a slow
//! reader slows the writer (backpressure), nothing piles up. When one side
//! stops sending, the other side's sending half is shut down (half-close
//! passes through); a connection idle for `idle_timeout` is closed. On
//! shutdown the listeners close at once and open connections get
//! `shutdown_grace` to finish. Handshake failures are counted by a typed
//! reason ([`meshca_tls::HandshakeFailure`]); `/metrics` and `/healthz` are
//! served on the optional health address.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), meshca_proxy::ProxyError> {
//! use meshca_proxy::{ProxyConfig, Route, Side};
//! let mut route = Route::new("api", Side::Server, "0.0.0.0:8443".parse().unwrap(),
//!     "127.0.0.1:8080".parse().unwrap(), "/var/run/meshca/api".into());
//! route.allow = vec!["spiffe://cluster.local/ns/shop/*".parse().unwrap()];
//! let config = ProxyConfig { health: None, shutdown_grace: meshca_pki::GoDuration(std::time::Duration::from_secs(30)), routes: vec![route] };
//! meshca_proxy::run(config, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
#![forbid(unsafe_code)]

mod config;
mod error;
mod metrics;
mod pipe;
pub mod proxy_v2;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshca_tls::{
    CertSet, HandshakeFailure, TlsAcceptor, TlsConfig, TlsConnector, TlsError, TlsMode,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::rustls::{HandshakeKind, ProtocolVersion};

pub use config::{DEFAULT_IDLE_TIMEOUT, DEFAULT_SHUTDOWN_GRACE, ProxyConfig, Route, Side, Target};
pub use error::ProxyError;
pub use metrics::{Metrics, Outcome};

/// How long connecting to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One route, ready to run.
struct Running {
    route: Route,
    tls: Tls,
    metrics: Arc<Metrics>,
}

enum Tls {
    Server(TlsAcceptor),
    Client(TlsConnector),
}

impl Running {
    fn current(&self) -> Option<Arc<CertSet>> {
        match &self.tls {
            Tls::Server(a) => a.current(),
            Tls::Client(c) => Some(c.current()),
        }
    }
}

/// Open connections, to wait for on shutdown.
#[derive(Default)]
struct Tracker {
    open: AtomicUsize,
    gone: Notify,
}

struct Guard(Arc<Tracker>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.gone.notify_waiters();
        }
    }
}

/// Checks every route (files, addresses) before anything listens, then
/// serves until `shutdown` completes; then stops accepting and gives open
/// connections the grace period.
pub async fn run(
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    config.validate()?;
    let metrics = Arc::new(Metrics::default());
    let mut ready = Vec::new();
    for route in &config.routes {
        let tls = match route.side {
            Side::Server => {
                let tls = TlsConfig {
                    mode: if route.permissive {
                        TlsMode::Permissive
                    } else {
                        TlsMode::Mtls
                    },
                    certs: Some(route.certs.clone()),
                    min_version: route.min_version,
                    redirect: None,
                    allow: route.allow.clone(),
                    // Bytes pass through: offering h2 would make a client
                    // speak HTTP/2 to a target that may not.
                    alpn: Some(Vec::new()),
                    revocation: route.revocation,
                };
                Tls::Server(TlsAcceptor::new(&tls).map_err(|source| ProxyError::Tls {
                    route: route.name.clone(),
                    source,
                })?)
            }
            Side::Client => Tls::Client(
                TlsConnector::new(&route.certs, route.server_identity()?, route.min_version)
                    .map_err(|source| ProxyError::Tls {
                        route: route.name.clone(),
                        source,
                    })?,
            ),
        };
        ready.push(Running {
            route: route.clone(),
            tls,
            metrics: metrics.clone(),
        });
    }
    let mut listeners = Vec::new();
    for r in &ready {
        let listener = TcpListener::bind(r.route.listen)
            .await
            .map_err(|e| ProxyError::Listen {
                route: r.route.name.clone(),
                addr: r.route.listen.to_string(),
                reason: e.to_string(),
            })?;
        listeners.push(listener);
    }
    let ready: Vec<Arc<Running>> = ready.into_iter().map(Arc::new).collect();
    if let Some(addr) = config.health {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| ProxyError::Listen {
                route: "health".into(),
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        tokio::spawn(health(listener, ready.clone(), metrics.clone()));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = Arc::new(Tracker::default());
    // One budget of files for every route (meshca-tls's limits): a proxied
    // connection holds two (the client's and the target's), so half the
    // connection cap, split evenly between the routes, so that routes
    // together cannot exceed it and a flood of one leaves the others theirs.
    let limits = meshca_tls::ConnLimits::default();
    let share = (limits.max_connections / 2 / ready.len().max(1)).max(2);
    let shared = limits
        .with_connections(share, 0)
        .map_err(|e| ProxyError::Listen {
            route: "all".into(),
            addr: String::new(),
            reason: e.to_string(),
        })?;
    let mut loops = Vec::new();
    for (r, listener) in ready.iter().zip(listeners) {
        tracing::info!(
            route = %r.route.name,
            side = ?r.route.side,
            listen = %r.route.listen,
            target = %r.route.target,
            "proxy route ready"
        );
        loops.push(tokio::spawn(accept_loop(
            r.clone(),
            listener,
            stop_rx.clone(),
            tracker.clone(),
            (shared, shared.gate()),
        )));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let grace = config.shutdown_grace.get();
    let open = tracker.open.load(Ordering::SeqCst);
    if open > 0 {
        tracing::info!(
            "stopped accepting; letting {open} open connection(s) finish (up to {grace:?})"
        );
        let drained = async {
            loop {
                let wait = tracker.gone.notified();
                if tracker.open.load(Ordering::SeqCst) == 0 {
                    return;
                }
                wait.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                "{} connection(s) still open after {grace:?}; closing them",
                tracker.open.load(Ordering::SeqCst)
            );
        }
    }
    Ok(())
}

async fn accept_loop(
    r: Arc<Running>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    tracker: Arc<Tracker>,
    (limits, gate): (meshca_tls::ConnLimits, meshca_tls::Gate),
) {
    // The limits every meshca listener shares (meshca-tls): the handshake
    // limit, and a connection cap (shared by the routes) so that a flood of
    // connections cannot use up the proxy's files (one past the cap is
    // closed at once).
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (tcp, from) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: say so, breathe, go on.
                tracing::warn!(route = %r.route.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = gate.admit(from.ip()) else {
            tracing::debug!(route = %r.route.name, peer_addr = %from, "connection closed: the route is at its connection limit ({})", limits.max_connections);
            drop(tcp);
            continue;
        };
        tracker.open.fetch_add(1, Ordering::SeqCst);
        let guard = Guard(tracker.clone());
        let r = r.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = slot;
            match &r.tls {
                Tls::Server(acceptor) => serve_one(&r, acceptor, tcp, from, limits.handshake).await,
                Tls::Client(connector) => originate_one(&r, connector, tcp, from).await,
            }
        });
    }
}

fn refuse(r: &Running, from: SocketAddr, reason: HandshakeFailure, detail: &str) {
    r.metrics.handshake_failure(&r.route.name, reason.label());
    r.metrics
        .connection(&r.route.name, Outcome::HandshakeFailed);
    tracing::warn!(
        route = %r.route.name,
        peer_addr = %from,
        reason = reason.label(),
        "refused: {detail}"
    );
}

/// A server route's connection: handshake (identity checked inside it),
/// target, optional PROXY header, bytes.
async fn serve_one(
    r: &Running,
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    from: SocketAddr,
    handshake: Duration,
) {
    let local = tcp.local_addr().unwrap_or(r.route.listen);
    let (conn, peer) = match acceptor.accept_within(tcp, handshake).await {
        Ok(c) => c,
        Err(TlsError::Handshake { reason, detail }) => return refuse(r, from, reason, &detail),
        Err(e) => return refuse(r, from, HandshakeFailure::Io, &e.to_string()),
    };
    // The verified certificate's SPIFFE ID, else its first DNS name.
    let identity = peer
        .identity()
        .and_then(|i| i.spiffe_id.clone().or_else(|| i.dns_names.first().cloned()));
    if let Some(id) = &identity {
        r.metrics.peer(&r.route.name, id);
    }
    let transport = match &conn {
        meshca_tls::Conn::Plain(_) => proxy_v2::Transport::Plaintext,
        meshca_tls::Conn::Tls(s) => {
            let session = s.get_ref().1;
            proxy_v2::Transport::Tls {
                version: match session.protocol_version() {
                    Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
                    Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
                    Some(other) => format!("{other:?}"),
                    None => String::new(),
                },
                // rustls keeps the client's certificates only once the
                // verifier (bundle and allow-list) and the signature check
                // accepted them: present here means presented and verified.
                // Without them the header claims no certificate at all.
                client: session
                    .peer_certificates()
                    .is_some_and(|certs| !certs.is_empty())
                    .then(|| proxy_v2::ClientCert {
                        on_connection: session.handshake_kind() != Some(HandshakeKind::Resumed),
                        identity: identity.clone(),
                    }),
            }
        }
    };
    let header = r.route.proxy_protocol.then(|| {
        proxy_v2::Header {
            source: from,
            destination: local,
            transport,
        }
        .encode()
    });
    let peer_name = match (&identity, peer.tls) {
        (Some(id), _) => id.as_str(),
        (None, true) => "anonymous (tls)",
        (None, false) => "plaintext",
    };
    match &r.route.target {
        Target::Tcp(addr) => {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(t)) => {
                    let _ = t.set_nodelay(true);
                    forward(r, conn, t, header, from, peer_name).await;
                }
                Ok(Err(e)) => unreachable_target(r, from, &e.to_string()),
                Err(_) => unreachable_target(r, from, "timed out"),
            }
        }
        Target::Unix(path) => match UnixStream::connect(path).await {
            Ok(t) => forward(r, conn, t, header, from, peer_name).await,
            Err(e) => unreachable_target(r, from, &e.to_string()),
        },
    }
}

fn unreachable_target(r: &Running, from: SocketAddr, why: &str) {
    r.metrics
        .connection(&r.route.name, Outcome::TargetUnreachable);
    tracing::warn!(
        route = %r.route.name,
        peer_addr = %from,
        target = %r.route.target,
        "cannot reach the target: {why}"
    );
}

async fn forward<A, B>(
    r: &Running,
    accepted: A,
    mut target: B,
    header: Option<Vec<u8>>,
    from: SocketAddr,
    peer: &str,
) where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Some(h) = header
        && let Err(e) = target.write_all(&h).await
    {
        return unreachable_target(r, from, &format!("writing the PROXY header: {e}"));
    }
    let name = &r.route.name;
    r.metrics.connection(name, Outcome::Proxied);
    r.metrics.active(name, 1);
    tracing::debug!(route = %name, peer_addr = %from, peer, "proxying");
    let (end, (inbound, outbound)) = pipe::pipe(accepted, target, r.route.idle_timeout.get()).await;
    r.metrics.active(name, -1);
    r.metrics.bytes(name, "in", inbound);
    r.metrics.bytes(name, "out", outbound);
    match end {
        pipe::End::Done => {}
        pipe::End::Idle => {
            r.metrics.idle_closed(name);
            tracing::debug!(route = %name, peer_addr = %from, "closed after the idle timeout");
        }
        pipe::End::Error(e) => {
            tracing::debug!(route = %name, peer_addr = %from, "connection ended: {e}");
        }
    }
}

/// A client route's connection: plaintext in, mTLS out (the server's
/// identity checked in the handshake).
async fn originate_one(r: &Running, connector: &TlsConnector, local: TcpStream, from: SocketAddr) {
    let _ = local.set_nodelay(true);
    let Target::Tcp(addr) = &r.route.target else {
        return unreachable_target(r, from, "a client route needs a TCP target");
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return unreachable_target(r, from, &e.to_string()),
        Err(_) => return unreachable_target(r, from, "timed out"),
    };
    let tls =
        match tokio::time::timeout(meshca_tls::HANDSHAKE_TIMEOUT, connector.connect(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return refuse(r, from, HandshakeFailure::of(&e), &e.to_string()),
            Err(_) => return refuse(r, from, HandshakeFailure::Timeout, "no handshake in time"),
        };
    let server = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| meshca_tls::PeerIdentity::from_der(c))
        .and_then(|i| i.spiffe_id.or_else(|| i.dns_names.first().cloned()))
        .unwrap_or_default();
    r.metrics.peer(&r.route.name, &server);
    forward(r, local, tls, None, from, &server).await;
}

/// `/healthz`: 200 while every route has a certificate that has not
/// expired; `/metrics`: Prometheus text. Plain HTTP (through meshca-tls,
/// mode off): it is meant for a local probe.
async fn health(listener: TcpListener, routes: Vec<Arc<Running>>, metrics: Arc<Metrics>) {
    use axum::Router;
    use axum::routing::get;
    let healthz = move || {
        let routes = routes.clone();
        async move {
            let now = time_now();
            let mut ok = true;
            let mut text = String::new();
            for r in &routes {
                let left = r
                    .current()
                    .and_then(|set| set.chain.first().cloned())
                    .and_then(|c| meshca_pki::describe(c.as_ref(), now).ok())
                    .map_or(0, |i| i.seconds_left);
                ok &= left > 0;
                text.push_str(&format!(
                    "route {}: {} (certificate valid for {left}s)\n",
                    r.route.name,
                    if left > 0 { "ok" } else { "EXPIRED" }
                ));
            }
            let status = if ok {
                http::StatusCode::OK
            } else {
                http::StatusCode::SERVICE_UNAVAILABLE
            };
            (status, text)
        }
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(move || async move { metrics.render() }));
    match TlsAcceptor::new(&TlsConfig::default()) {
        Ok(acceptor) => {
            let served = meshca_tls::serve_with(
                listener,
                Arc::new(acceptor),
                app,
                meshca_tls::ConnLimits::small(),
            )
            .await;
            if let Err(e) = served {
                tracing::error!("the health listener stopped: {e}");
            }
        }
        Err(e) => tracing::error!("the health listener cannot start: {e}"),
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}
