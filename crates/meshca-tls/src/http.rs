//! HTTP over the switch: serve an axum router in any mode, and the plain
//! listener that redirects to HTTPS.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
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
    use super::redirect_location;

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
