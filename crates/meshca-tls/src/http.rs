//! HTTP over the switch: serve an axum router in any mode, and the plain
//! listener that redirects to HTTPS.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::TlsAcceptor;

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` through `acceptor`, forever. Each request
/// carries the connection's [`Peer`](crate::Peer) in its extensions (in axum:
/// `Extension<Peer>`). A failed handshake closes that connection only.
pub async fn serve(
    listener: TcpListener,
    acceptor: Arc<TlsAcceptor>,
    app: Router,
) -> std::io::Result<()> {
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
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let (conn, peer) = match acceptor.accept(tcp).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::info!(%remote, "connection refused: {e}");
                    return;
                }
            };
            // hyper's header timeout starts with the first byte of a request:
            // until then a connection would be held forever (10,000 idle ones
            // use up the server's files). The first byte is due as soon as the
            // headers would be.
            let conn = FirstByteDeadline::new(conn, HEADER_TIMEOUT);
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                app.clone().oneshot(req)
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A client that never finishes its request headers is cut off.
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(conn), svc)
                .await
            {
                tracing::debug!(%remote, "connection ended: {e}");
            }
        });
    }
}

/// A connection that fails its read with `TimedOut` when the client has sent
/// nothing `limit` after it was wrapped; from the first byte on, a plain pass
/// through (hyper's own timeouts take over).
struct FirstByteDeadline<I> {
    io: I,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> FirstByteDeadline<I> {
    fn new(io: I, limit: Duration) -> Self {
        FirstByteDeadline {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstByteDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent no request in time",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstByteDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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
/// same path on the HTTPS port (host from the request's Host header).
pub async fn serve_redirect(listener: TcpListener, https_port: u16) -> std::io::Result<()> {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
                    .or_else(|| req.uri().host().map(str::to_owned))
                    .unwrap_or_default();
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let mut resp = Response::new(String::new());
                match redirect_location(&host, https_port, pq)
                    .and_then(|l| HeaderValue::from_str(&l).ok())
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
                Ok::<_, Infallible>(resp)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{FirstByteDeadline, redirect_location};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_silent_client_times_out_and_a_talking_one_never_does() {
        let (_client, server) = tokio::io::duplex(64);
        let mut silent = FirstByteDeadline::new(server, Duration::from_millis(100));
        let mut buf = [0u8; 8];
        let e = silent.read(&mut buf).await.err().map(|e| e.kind());
        assert_eq!(e, Some(std::io::ErrorKind::TimedOut));

        let (mut client, server) = tokio::io::duplex(64);
        let mut talking = FirstByteDeadline::new(server, Duration::from_millis(100));
        client.write_all(b"G").await.ok();
        assert_eq!(talking.read(&mut buf).await.ok(), Some(1));
        // Long past the deadline, a pause between requests is hyper's business.
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"ET").await.ok();
        assert_eq!(talking.read(&mut buf).await.ok(), Some(2));
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
