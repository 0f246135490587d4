//! The TLS switch any Rust server can embed: `off`, `tls`, `mtls` or
//! `permissive`, with certificates that change underneath a running server.
//!
//! # Design
//! A [`TlsConfig`] (serde: flags, environment or file) names the mode, the
//! certificate directory (`tls.crt`, `tls.key`, `ca.crt`: the kubernetes.io/tls
//! layout the meshca agent writes), the oldest TLS version (1.3 by default)
//! and the allowed peers. [`TlsAcceptor::new`] checks the set once, so a
//! missing, unparsable, mismatched, expired or untrusted set stops start-up
//! with an error naming the file; then a [`CertSource`] polls the files and
//! publishes every good new set over a `tokio::sync::watch`, from which a
//! fresh `Arc<rustls::ServerConfig>` is built. Each handshake takes the newest
//! configuration; open connections keep theirs. A bad new set is logged and
//! ignored. In `mtls` the allow-list is checked inside the handshake, so a
//! peer outside it is refused with a TLS alert, not after the fact.
//! `permissive` peeks at the first byte: `0x16` starts a TLS handshake,
//! anything else is plaintext, and the handler learns which through [`Peer`].
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use axum::{Extension, Router, routing::get};
//! use meshca_tls::{Peer, TlsAcceptor, TlsConfig, TlsMode};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = TlsConfig { mode: TlsMode::Mtls, certs: Some("/etc/tls".into()), ..Default::default() };
//! let acceptor = Arc::new(TlsAcceptor::new(&config)?);
//! let app = Router::new().route("/", get(|Extension(peer): Extension<Peer>| async move { peer.describe() }));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8443").await?;
//! meshca_tls::serve(listener, acceptor, app).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod client;
mod config;
mod creds;
mod error;
mod http;
mod identity;
mod limits;
mod reload;
mod server;
mod verify;

pub use client::{TlsConnector, client_config};
pub use config::{PeerMatcher, Revocation, TlsConfig, TlsMode, TlsVersion};
pub use creds::{CertPaths, CertSet};
pub use error::{HandshakeFailure, TlsError};
pub use http::{
    CloseConnection, redirect_location, serve, serve_redirect, serve_redirect_with, serve_with,
};
pub use identity::{NoPeerIdentity, Peer, PeerIdentity};
pub use limits::{
    Admission, ConnLimits, Gate, HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT, Slot,
    default_max_connections, default_reserved,
};
pub use reload::{CertSource, DEFAULT_POLL};
pub use server::{Conn, TlsAcceptor, server_config};
pub use verify::ServerIdentity;
