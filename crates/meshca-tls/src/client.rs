//! The client side: present our identity, trust `ca.crt`, check the server's.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::creds::CertSet;
use crate::reload::{CertSource, DEFAULT_POLL};
use crate::server::{provider, versions};
use crate::verify::{IdentityServerVerifier, ServerIdentity};
use crate::{TlsError, TlsVersion};

/// Builds a client configuration that presents `set`'s certificate, trusts
/// its bundle, and accepts only a server with the `expected` identity.
pub fn client_config(
    set: &CertSet,
    expected: &ServerIdentity,
    min_version: TlsVersion,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let roots = set
        .roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::Rustls(format!("trust bundle: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let verifier = Arc::new(IdentityServerVerifier {
        roots,
        expected: expected.clone(),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(min_version))
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        // Not a relaxation: this verifier checks the chain against ca.crt
        // exactly as the default one does, and then a SPIFFE ID or DNS name.
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(set.chain.clone(), set.key())
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    // A resumed session skips the verifier: a server whose certificate
    // expired since the first handshake would still be accepted.
    config.resumption = rustls::client::Resumption::disabled();
    if matches!(expected, ServerIdentity::Spiffe(_)) {
        // There is no host name to announce for a SPIFFE identity.
        config.enable_sni = false;
    }
    Ok(config)
}

/// Connects with the newest good credentials of a watched directory.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    source: CertSource,
    configs: watch::Receiver<Arc<ClientConfig>>,
    expected: ServerIdentity,
}

impl TlsConnector {
    /// Loads the credentials of `dir` and watches them. Needs a tokio runtime.
    pub fn new(
        dir: &Path,
        expected: ServerIdentity,
        min_version: TlsVersion,
    ) -> Result<Self, TlsError> {
        Self::with_poll(dir, expected, min_version, DEFAULT_POLL)
    }

    /// As [`TlsConnector::new`], checking the files every `poll`.
    pub fn with_poll(
        dir: &Path,
        expected: ServerIdentity,
        min_version: TlsVersion,
        poll: Duration,
    ) -> Result<Self, TlsError> {
        let source = CertSource::watch(dir, poll)?;
        let first = client_config(&source.current(), &expected, min_version)?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let mut sets = source.subscribe();
        let exp = expected.clone();
        tokio::spawn(async move {
            while sets.changed().await.is_ok() {
                let set = sets.borrow_and_update().clone();
                match client_config(&set, &exp, min_version) {
                    Ok(c) => {
                        if tx.send(Arc::new(c)).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::error!("keeping the previous TLS client configuration: {e}"),
                }
            }
        });
        Ok(TlsConnector {
            source,
            configs: rx,
            expected,
        })
    }

    /// The configuration in use now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.configs.borrow().clone()
    }

    /// The credential set in use now.
    pub fn current(&self) -> Arc<CertSet> {
        self.source.current()
    }

    /// Runs a TLS handshake over `tcp`, checking the server's identity.
    pub async fn connect(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let _ = tcp.set_nodelay(true);
        let name = match &self.expected {
            ServerIdentity::Dns(d) => ServerName::try_from(d.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            // Not sent (SNI is off for SPIFFE) and not checked: the verifier
            // matches the SPIFFE ID instead.
            ServerIdentity::Spiffe(_) => ServerName::try_from("spiffe.invalid")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        };
        tokio_rustls::TlsConnector::from(self.client_config())
            .connect(name, tcp)
            .await
    }
}
