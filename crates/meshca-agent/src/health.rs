//! `/healthz` (200 while the certificate is valid, else 503) and `/metrics`
//! (time left, renewals) on the optional `--health` address, served through
//! `meshca-tls` like every listener meshca opens (mode `off`: it is meant for
//! a local probe).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use http::StatusCode;
use time::OffsetDateTime;

use crate::Held;

type Shared = (Arc<std::sync::Mutex<Held>>, Arc<AtomicU64>);

fn left(held: &Arc<std::sync::Mutex<Held>>) -> (String, i64) {
    let h = held.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (
        h.serial,
        (h.not_after - OffsetDateTime::now_utc()).whole_seconds(),
    )
}

async fn healthz(State((held, _)): State<Shared>) -> (StatusCode, String) {
    match left(&held) {
        (serial, secs) if secs > 0 => (
            StatusCode::OK,
            format!("ok: serial {serial} valid for {secs}s\n"),
        ),
        (serial, secs) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("certificate {serial} expired {}s ago\n", -secs),
        ),
    }
}

async fn metrics(State((held, renewals)): State<Shared>) -> String {
    let (_, secs) = left(&held);
    format!(
        "# TYPE meshca_agent_certificate_expiry_seconds gauge\nmeshca_agent_certificate_expiry_seconds {secs}\n# TYPE meshca_agent_renewals_total counter\nmeshca_agent_renewals_total {}\n",
        renewals.load(Ordering::Relaxed)
    )
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    held: Arc<std::sync::Mutex<Held>>,
    renewals: Arc<AtomicU64>,
) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state((held, renewals));
    match meshca_tls::TlsAcceptor::new(&meshca_tls::TlsConfig::default()) {
        Ok(acceptor) => {
            // The agent's process has nothing else to spend its files on:
            // the health port takes the default cap (the probe that restarts
            // the pod must get through a flood of half-open connections).
            if let Err(e) = meshca_tls::serve(listener, Arc::new(acceptor), app).await {
                tracing::error!("the health listener stopped: {e}");
            }
        }
        Err(e) => tracing::error!("the health listener cannot start: {e}"),
    }
}
