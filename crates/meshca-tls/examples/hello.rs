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
    /// off, tls, mtls or permissive.
    #[arg(long, default_value = "off")]
    mode: TlsMode,
    /// Directory with tls.crt, tls.key and ca.crt.
    #[arg(long)]
    certs: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// A plain listener that redirects to HTTPS.
    #[arg(long)]
    redirect: Option<SocketAddr>,
    /// Allowed peers (SPIFFE IDs or DNS names; a trailing * is a prefix).
    #[arg(long)]
    allow: Vec<PeerMatcher>,
    /// Oldest TLS version: 1.3 or 1.2.
    #[arg(long, default_value = "1.3")]
    min_version: TlsVersion,
}

#[derive(serde::Deserialize)]
struct Bulk {
    bytes: usize,
}

async fn hello(Extension(peer): Extension<Peer>) -> String {
    let how = if peer.tls { "tls" } else { "plaintext" };
    format!("{} ({how})\n", peer.describe())
}

async fn bulk(Query(q): Query<Bulk>) -> Vec<u8> {
    vec![b'x'; q.bytes.min(1 << 30)]
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let config = TlsConfig {
        mode: a.mode,
        certs: a.certs,
        min_version: a.min_version,
        redirect: a.redirect,
        allow: a.allow,
    };
    match run(config, a.listen).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: TlsConfig, listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let acceptor = Arc::new(TlsAcceptor::new(&config)?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    if let Some(addr) = config.redirect {
        let plain = tokio::net::TcpListener::bind(addr).await?;
        tokio::spawn(meshca_tls::serve_redirect(
            plain,
            listener.local_addr()?.port(),
        ));
    }
    let app = Router::new()
        .route("/", get(hello))
        .route("/bulk", get(bulk));
    eprintln!("hello: {} on {}", config.mode, listener.local_addr()?);
    meshca_tls::serve(listener, acceptor, app).await?;
    Ok(())
}
