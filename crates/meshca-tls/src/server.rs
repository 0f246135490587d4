//! The server side: accepting connections in any mode.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::creds::CertSet;
use crate::identity::{NoPeerIdentity, Peer, PeerIdentity};
use crate::reload::{CertSource, DEFAULT_POLL};
use crate::verify::AllowListVerifier;
use crate::{HandshakeFailure, TlsConfig, TlsError, TlsMode, TlsVersion};

use crate::limits::HANDSHAKE_TIMEOUT;

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
static TLS12_AND_13: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];

pub(crate) fn versions(v: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match v {
        TlsVersion::V1_3 => &TLS13_ONLY,
        TlsVersion::V1_2 => &TLS12_AND_13,
    }
}

pub(crate) fn root_store(set: &CertSet) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for r in &set.roots {
        roots
            .add(r.clone())
            .map_err(|e| TlsError::Rustls(format!("trust bundle: {e}")))?;
    }
    Ok(roots)
}

/// Builds the rustls server configuration of `mode` for a credential set.
pub fn server_config(set: &CertSet, config: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(config.min_version))
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match config.mode {
        TlsMode::Off => return Err(TlsError::Config("mode off has no TLS configuration".into())),
        TlsMode::Tls => builder.with_no_client_auth(),
        TlsMode::Mtls | TlsMode::Permissive => {
            let roots = Arc::new(root_store(set)?);
            // Revocation of the leaf, against its issuer's CRL in ca.crl
            // (the intermediates are meshca's own and change by rotation).
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .with_crls(set.crls.iter().cloned())
                .only_check_end_entity_revocation();
            let verifier = match config.revocation {
                crate::Revocation::FailOpen => verifier.allow_unknown_revocation_status(),
                crate::Revocation::FailClosed => verifier.enforce_revocation_expiration(),
            };
            let verifier = if config.mode == TlsMode::Permissive {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let inner = verifier
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(Arc::new(AllowListVerifier {
                inner,
                allow: config.allow.clone(),
                // WebPKI checks nothing without CRLs at all: failing closed
                // then means refusing every client certificate.
                no_revocation_info: config.revocation == crate::Revocation::FailClosed
                    && set.crls.is_empty(),
            }))
        }
    };
    let mut server = builder
        .with_single_cert(set.chain.clone(), set.key())
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    server.alpn_protocols = match &config.alpn {
        None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
    };
    // Sessions are resumed (a full handshake costs the CPU that floods and
    // reconnecting clients compete for), but a resumed session is not
    // verified again: rustls hands back the client certificate of the
    // first handshake. `accept` checks that certificate's validity again
    // for every resumed session. A reloaded set builds a new config, and
    // with it new session storage: sessions of the old trust end with it.
    Ok(server)
}

/// A connection after `accept`: plaintext or TLS.
#[derive(Debug)]
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Accepts connections for one listener in its configured mode, always with
/// the newest good credentials.
#[derive(Debug, Clone)]
pub struct TlsAcceptor {
    mode: TlsMode,
    source: Option<CertSource>,
    configs: Option<watch::Receiver<Arc<ServerConfig>>>,
}

impl TlsAcceptor {
    /// Validates `config`, loads and checks its credentials (an error names
    /// the file and the problem), and starts watching them. Needs a tokio runtime.
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        Self::with_poll(config, DEFAULT_POLL)
    }

    /// As [`TlsAcceptor::new`], checking the files every `poll`.
    pub fn with_poll(config: &TlsConfig, poll: Duration) -> Result<Self, TlsError> {
        config.validate()?;
        let Some(dir) = config
            .certs
            .as_deref()
            .filter(|_| config.mode != TlsMode::Off)
        else {
            return Ok(TlsAcceptor {
                mode: TlsMode::Off,
                source: None,
                configs: None,
            });
        };
        let source = CertSource::watch(dir, poll)?;
        let first = server_config(&source.current(), config)?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let mut sets = source.subscribe();
        let task_config = config.clone();
        tokio::spawn(async move {
            while sets.changed().await.is_ok() {
                let set = sets.borrow_and_update().clone();
                match server_config(&set, &task_config) {
                    Ok(c) => {
                        if tx.send(Arc::new(c)).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::error!("keeping the previous TLS configuration: {e}"),
                }
            }
        });
        Ok(TlsAcceptor {
            mode: config.mode,
            source: Some(source),
            configs: Some(rx),
        })
    }

    /// The listener's mode.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The credential set in use, if the mode has one.
    pub fn current(&self) -> Option<Arc<CertSet>> {
        self.source.as_ref().map(CertSource::current)
    }

    /// The rustls configuration in use (for callers with their own accept loop).
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.configs.as_ref().map(|rx| rx.borrow().clone())
    }

    /// Takes a freshly accepted TCP connection through the mode: nothing for
    /// `off`, a TLS handshake for `tls`/`mtls`, and for `permissive` a look at
    /// the first byte (0x16 opens a TLS handshake) to pick one or the other.
    pub async fn accept(&self, tcp: TcpStream) -> Result<(Conn, Peer), TlsError> {
        self.accept_within(tcp, HANDSHAKE_TIMEOUT).await
    }

    /// [`TlsAcceptor::accept`] with the handshake limit given (a listener's
    /// [`ConnLimits::handshake`](crate::ConnLimits)).
    pub async fn accept_within(
        &self,
        tcp: TcpStream,
        limit: Duration,
    ) -> Result<(Conn, Peer), TlsError> {
        let _ = tcp.set_nodelay(true);
        let Some(configs) = &self.configs else {
            return Ok((
                Conn::Plain(tcp),
                Peer {
                    tls: false,
                    identity: Err(NoPeerIdentity::TlsOff),
                },
            ));
        };
        if self.mode == TlsMode::Permissive {
            let mut first = [0u8; 1];
            let n = tokio::time::timeout(limit, tcp.peek(&mut first))
                .await
                .map_err(|_| TlsError::Io("client sent nothing".into()))?
                .map_err(|e| TlsError::Io(e.to_string()))?;
            if n == 0 || first[0] != 0x16 {
                return Ok((
                    Conn::Plain(tcp),
                    Peer {
                        tls: false,
                        identity: Err(NoPeerIdentity::Plaintext),
                    },
                ));
            }
        }
        let config = configs.borrow().clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let tls = tokio::time::timeout(limit, acceptor.accept(tcp))
            .await
            .map_err(|_| TlsError::Handshake {
                reason: HandshakeFailure::Timeout,
                detail: format!("no handshake within {limit:?}"),
            })?
            .map_err(|e| TlsError::Handshake {
                reason: HandshakeFailure::of(&e),
                detail: e.to_string(),
            })?;
        let conn = tls.get_ref().1;
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
            && let Some(leaf) = conn.peer_certificates().and_then(|c| c.first())
        {
            let now = time::OffsetDateTime::now_utc();
            let valid = meshca_pki::cert_facts(leaf)
                .is_ok_and(|f| f.not_before <= now && now < f.not_after);
            if !valid {
                return Err(TlsError::Handshake {
                        reason: HandshakeFailure::Expired,
                        detail: "the client certificate of this resumed session is no longer valid (checked when the session began); the client must connect again with a valid certificate".into(),
                    });
            }
        }
        let identity = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| PeerIdentity::from_der(c))
            .ok_or(NoPeerIdentity::NoClientCertificate);
        Ok((
            Conn::Tls(Box::new(tls)),
            Peer {
                tls: true,
                identity,
            },
        ))
    }
}
