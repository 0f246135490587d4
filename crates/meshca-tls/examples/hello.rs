//! A small HTTP server showing the whole TLS switch:
//!
//! ```text
//! cargo run -p meshca-tls --example hello -- --mode mtls --certs DIR --listen 127.0.0.1:8443 [--redirect 127.0.0.1:8080]
//! ```
//! `GET /` answers with the verified peer identity, or `anonymous`;
//! `GET /bulk?bytes=N` streams N bytes (for throughput benchmarks).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::Query;
use axum::{Extension, Router, routing::get};
use clap::Parser;
use meshca_tls::{Peer, PeerMatcher, TlsAcceptor, TlsConfig, TlsMode, TlsVersion};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "off", help = "off, tls, mtls or permissive")]
    mode: TlsMode,
    #[arg(long, help = "directory with tls.crt, tls.key and ca.crt")]
    certs: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    #[arg(long, help = "a plain listener that redirects to HTTPS")]
    redirect: Option<SocketAddr>,
    #[arg(
        long,
        help = "allowed peer (mtls): an exact SPIFFE ID, spiffe://td/ns/x/* for every ID below a path, or an exact DNS name"
    )]
    allow: Vec<PeerMatcher>,
    #[arg(long, default_value = "1.3", help = "oldest TLS version: 1.3 or 1.2")]
    min_version: TlsVersion,
}

async fn hello(Extension(peer): Extension<Peer>) -> String {
    let how = if peer.tls { "tls" } else { "plaintext" };
    format!("{} ({how})\n", peer.describe())
}

/// Serves N bytes from one shared buffer (grown on demand, never copied).
async fn bulk(Query(q): Query<std::collections::HashMap<String, usize>>) -> axum::body::Bytes {
    static BUF: std::sync::Mutex<axum::body::Bytes> =
        std::sync::Mutex::new(axum::body::Bytes::new());
    let n = q.get("bytes").copied().unwrap_or(0).min(1 << 30);
    let mut buf = BUF.lock().unwrap_or_else(|e| e.into_inner());
    if buf.len() < n {
        *buf = vec![b'x'; n].into();
    }
    buf.slice(..n)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let (mode, certs, min_version, redirect, allow) =
        (a.mode, a.certs, a.min_version, a.redirect, a.allow);
    let config = TlsConfig {
        mode,
        certs,
        min_version,
        redirect,
        allow,
        alpn: None,
        revocation: Default::default(),
    };
    match run(config, a.listen).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}"); // a bad certificate set is named here: file and problem
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: TlsConfig, listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let acceptor = Arc::new(TlsAcceptor::new(&config)?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    if let Some(addr) = config.redirect {
        let port = listener.local_addr()?.port();
        tokio::spawn(meshca_tls::serve_redirect(
            tokio::net::TcpListener::bind(addr).await?,
            port,
        ));
    }
    let app = Router::new()
        .route("/", get(hello))
        .route("/bulk", get(bulk));
    eprintln!("hello: {} on {}", config.mode, listener.local_addr()?);
    Ok(meshca_tls::serve(listener, acceptor, app).await?)
}
