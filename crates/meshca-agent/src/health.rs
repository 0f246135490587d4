//! `/healthz` (200 while the certificate is valid, else 503) and `/metrics`
//! (time left, renewals) on the optional `--health` address.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;

use crate::Held;

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    held: Arc<std::sync::Mutex<Held>>,
    renewals: Arc<AtomicU64>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (held, renewals) = (held.clone(), renewals.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let h = held.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let left = (h.not_after - OffsetDateTime::now_utc()).whole_seconds();
                let (status, body) = match req.uri().path() {
                    "/healthz" if left > 0 => (
                        StatusCode::OK,
                        format!("ok: serial {} valid for {left}s\n", h.serial),
                    ),
                    "/healthz" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("certificate {} expired {}s ago\n", h.serial, -left),
                    ),
                    "/metrics" => (
                        StatusCode::OK,
                        format!(
                            "# TYPE meshca_agent_certificate_expiry_seconds gauge\nmeshca_agent_certificate_expiry_seconds {left}\n# TYPE meshca_agent_renewals_total counter\nmeshca_agent_renewals_total {}\n",
                            renewals.load(Ordering::Relaxed)
                        ),
                    ),
                    _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
