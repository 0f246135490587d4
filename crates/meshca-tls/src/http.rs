//! HTTP over the switch: serve an axum router in any mode, and the plain
//! listener that redirects to HTTPS.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::TlsAcceptor;
use crate::limits::{Admission, ConnLimits, Gate, Slot};

/// Serves `app` on `listener` through `acceptor`, forever, with the
/// default [`ConnLimits`]. Each request carries the connection's
/// [`Peer`](crate::Peer) and [`Admission`] in its extensions (in axum:
/// `Extension<Peer>`). A failed handshake closes that connection only.
pub async fn serve(
    listener: TcpListener,
    acceptor: Arc<TlsAcceptor>,
    app: Router,
) -> std::io::Result<()> {
    serve_with(listener, acceptor, app, ConnLimits::default()).await
}

/// The send buffer of each HTTP connection (the kernel doubles it).
const SEND_BUFFER: usize = 128 * 1024;

/// Accepts the next connection the gate admits; one past the cap is closed
/// at once (it costs the process a file only for that moment).
async fn next_admitted(listener: &TcpListener, gate: &Gate) -> (TcpStream, SocketAddr, Slot) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match gate.admit(remote.ip()) {
            Some(slot) => return (tcp, remote, slot),
            None => {
                tracing::debug!(%remote, "connection closed: the listener is at its connection limit");
                drop(tcp);
            }
        }
    }
}

/// [`serve`] with the limits given.
pub async fn serve_with(
    listener: TcpListener,
    acceptor: Arc<TlsAcceptor>,
    app: Router,
    limits: ConnLimits,
) -> std::io::Result<()> {
    let gate = limits.gate();
    loop {
        let (tcp, remote, slot) = next_admitted(&listener, &gate).await;
        // What a client that sends requests and never reads the answers
        // can make the server produce before backpressure stops it: the
        // kernel's autotuned buffers (megabytes with a large tcp_rmem on the
        // other side) let 64 such clients cost seconds of CPU, which every
        // well-behaved caller waits behind. Answers are small; a large one
        // still streams, at the pace the client reads.
        if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!("cannot bound the send buffer: {e}");
        }
        let acceptor = acceptor.clone();
        let app = app.clone();
        // A reserved place turns over quickly: 2 s for the handshake, the
        // request headers and between requests.
        let limits = match slot.admission {
            Admission::Normal => limits,
            Admission::Reserve => ConnLimits {
                handshake: limits.reserve_handshake,
                header: limits.reserve_handshake,
                idle: limits.reserve_handshake,
                ..limits
            },
        };
        tokio::spawn(async move {
            let (conn, peer) = match acceptor.accept_within(tcp, limits.handshake).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::info!(%remote, "connection refused: {e}");
                    return;
                }
            };
            let admission = slot.admission;
            serve_connection(TokioIo::new(conn), app, (peer, admission), &limits, remote).await;
            drop(slot);
        });
    }
}

/// Serves one connection under `limits`: the header timeout, and the idle
/// timeout, whatever the protocol. A connection with no request in flight
/// for `limits.idle` is closed: hyper's HTTP/1 header timeout starts only
/// with a request's first byte, and HTTP/2 has none, so one that never asks
/// would be held forever (10,000 of them use up the server's files). A
/// streamed answer (events) is a request in flight until it ends.
async fn serve_connection<I>(
    io: I,
    app: Router,
    (peer, admission): (crate::Peer, Admission),
    limits: &ConnLimits,
    remote: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Activity::default();
    let tracker = activity.clone();
    let body_limit = limits.body;
    // What the application may use to end this connection after its
    // answer, whatever the protocol (HTTP/2 ignores `Connection: close`).
    let close_tx = CloseConnection(Arc::new(Notify::new()));
    let closing = close_tx.0.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let in_flight = tracker.begin();
        // The body has its own deadline: a request waiting for a body that
        // never comes is in flight, and would hold the connection forever.
        let mut req = req.map(|b| axum::body::Body::new(Deadline::new(b, body_limit)));
        req.extensions_mut().insert(peer.clone());
        req.extensions_mut().insert(admission);
        req.extensions_mut().insert(close_tx.clone());
        let answer = app.clone().oneshot(req);
        async move {
            let resp = answer.await?;
            Ok::<_, Infallible>(resp.map(|body| {
                axum::body::Body::new(Tracked {
                    inner: body,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that never finishes its request headers is cut off.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header);
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = closing.notified() => {
            // Asked by the application: the answer in flight is finished
            // (graceful), nothing more is taken.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(Duration::from_secs(2), conn).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
        () = activity.idle_for(limits.idle) => {
            // HTTP/1: closed now. HTTP/2: GOAWAY and a PING; a client
            // that never answers the PING is not waited for long
            // (nothing is in flight, so nothing is cut short).
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(Duration::from_secs(1), conn).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%remote, "connection ended: {e}");
    }
}

/// In each request's extensions: ends the connection once the answers in
/// flight are sent (a GOAWAY on HTTP/2), for an application that wants a
/// caller gone (meshca's API, past its connection share).
#[derive(Debug, Clone)]
pub struct CloseConnection(Arc<Notify>);

impl CloseConnection {
    /// Ends the connection after the answers in flight.
    pub fn close(&self) {
        self.0.notify_one();
    }
}

/// The requests in flight on one connection.
#[derive(Clone, Default)]
struct Activity(Arc<ActivityState>);

#[derive(Default)]
struct ActivityState {
    in_flight: AtomicUsize,
    changed: Notify,
}

/// One request in flight, until its answer's body is dropped.
struct InFlight(Activity);

// Only the moves between idle and busy concern `idle_for`: the other
// requests of a busy connection touch a counter and nothing else.
impl Drop for InFlight {
    fn drop(&mut self) {
        if (self.0).0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            (self.0).0.changed.notify_waiters();
        }
    }
}

impl Activity {
    fn begin(&self) -> InFlight {
        if self.0.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.0.changed.notify_waiters();
        }
        InFlight(self.clone())
    }

    /// Returns once no request has been in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            // Listen before looking, so that a change in between is not missed.
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.0.in_flight.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    () = tokio::time::sleep(limit) => return,
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// A request body that must arrive whole by a deadline.
struct Deadline {
    inner: Incoming,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(inner: Incoming, limit: Duration) -> Self {
        Deadline {
            inner,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl http_body::Body for Deadline {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the request body did not arrive within {:?}",
                    this.limit
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body that holds its request's [`InFlight`] until it is
/// sent or dropped.
struct Tracked {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `Location` for a request to `host` (from its Host header) and
/// `path_and_query`, on the HTTPS port.
pub fn redirect_location(host: &str, https_port: u16, path_and_query: &str) -> Option<String> {
    // Host may carry a port (`example.com:8080`, `[::1]:8080`): drop it.
    let name = if let Some(rest) = host.strip_prefix('[') {
        format!("[{}]", rest.split(']').next()?)
    } else {
        host.split(':').next()?.to_owned()
    };
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return None;
    }
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    Some(format!("https://{name}{port}{path_and_query}"))
}

/// Answers every request on `listener` with `301 Moved Permanently` to the
/// same path on the HTTPS port (host from the request's Host header), under
/// the default [`ConnLimits`].
pub async fn serve_redirect(listener: TcpListener, https_port: u16) -> std::io::Result<()> {
    serve_redirect_with(listener, https_port, ConnLimits::default()).await
}

/// [`serve_redirect`] with the limits given: the same handshake (none:
/// plain HTTP), header and idle limits as every other listener, and a
/// connection cap of its own.
pub async fn serve_redirect_with(
    listener: TcpListener,
    https_port: u16,
    limits: ConnLimits,
) -> std::io::Result<()> {
    let plain = TlsAcceptor::new(&crate::TlsConfig::default())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let app = Router::new().fallback(move |req: Request<axum::body::Body>| async move {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().host().map(str::to_owned))
            .unwrap_or_default();
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut resp = Response::new(axum::body::Body::empty());
        match redirect_location(&host, https_port, pq).and_then(|l| HeaderValue::from_str(&l).ok())
        {
            Some(loc) => {
                *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
                resp.headers_mut().insert(header::LOCATION, loc);
            }
            None => {
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                *resp.body_mut() = "a Host header is needed to redirect to HTTPS\n".into();
            }
        }
        resp
    });
    serve_with(listener, Arc::new(plain), app, limits).await
}

#[cfg(test)]
mod tests {
    use super::{Activity, redirect_location};
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn idle_means_nothing_in_flight_for_the_whole_limit() {
        let limit = Duration::from_millis(200);
        let activity = Activity::default();
        let started = Instant::now();
        activity.idle_for(limit).await;
        assert!(started.elapsed() >= limit);

        // A request in flight for 500 ms: idle only 200 ms after it ends.
        let busy = activity.begin();
        let waiter = activity.clone();
        let started = Instant::now();
        let idle = tokio::spawn(async move { waiter.idle_for(limit).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!idle.is_finished());
        drop(busy);
        idle.await.ok();
        assert!(started.elapsed() >= Duration::from_millis(700));
    }

    #[test]
    fn locations() {
        assert_eq!(
            redirect_location("example.com", 8443, "/a?b=1").as_deref(),
            Some("https://example.com:8443/a?b=1")
        );
        assert_eq!(
            redirect_location("example.com:8080", 443, "/").as_deref(),
            Some("https://example.com/")
        );
        assert_eq!(
            redirect_location("[::1]:8080", 9443, "/x").as_deref(),
            Some("https://[::1]:9443/x")
        );
        assert_eq!(redirect_location("", 443, "/"), None);
        assert_eq!(redirect_location("evil.com/x", 443, "/"), None);
    }
}
