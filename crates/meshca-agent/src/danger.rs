//! The one place where the agent talks TLS without verifying the server:
//! fetching the public trust bundle before it knows which CA to trust. Nothing
//! secret is sent on that connection, and of what comes back only the root
//! with the fingerprint the operator pinned is kept, with the roots that
//! root's key vouched for through the chain of custody.

use std::sync::Arc;

use meshca_client::{Client, ClientError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// The most read from a server not yet verified: a bundle of a few roots,
/// a custody chain of a thousand rotations.
const MAX_UNVERIFIED: usize = 4 << 20;

/// Fetches `GET /v1/bundle` without verifying the server (see the module docs).
#[derive(Debug)]
pub struct PinningFetch {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinningFetch {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Not verified on purpose: the bundle is checked against the pin instead.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl PinningFetch {
    /// The server's trust bundle, PEM, unverified: check it against the pin.
    pub async fn bundle(server: &str) -> Result<String, ClientError> {
        Self::get(server, "/v1/bundle").await
    }

    /// The chain of custody between roots, PEM, unverified: every link is
    /// checked against the pinned root's key. A server without the endpoint
    /// (older) has no links to offer.
    pub async fn custody(server: &str) -> Result<String, ClientError> {
        match Self::fetch(server, "/v1/bundle/custody").await? {
            (status, _) if status == http::StatusCode::NOT_FOUND => Ok(String::new()),
            (status, body) => Self::answer("/v1/bundle/custody", status, body),
        }
    }

    async fn get(server: &str, path: &str) -> Result<String, ClientError> {
        let (status, body) = Self::fetch(server, path).await?;
        Self::answer(path, status, body)
    }

    fn answer(
        path: &str,
        status: http::StatusCode,
        body: bytes::Bytes,
    ) -> Result<String, ClientError> {
        if !status.is_success() {
            return Err(ClientError::Protocol(format!(
                "GET {path} answered {}",
                status.as_u16()
            )));
        }
        String::from_utf8(body.to_vec())
            .map_err(|_| ClientError::Protocol(format!("GET {path}: the answer is not text")))
    }

    /// One unverified GET, its answer bounded to [`MAX_UNVERIFIED`].
    async fn fetch(
        server: &str,
        path: &str,
    ) -> Result<(http::StatusCode, bytes::Bytes), ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinningFetch { provider }))
            .with_no_client_auth();
        let client = Client::with_config(server, config)?.with_body_limit(MAX_UNVERIFIED);
        client.raw(http::Method::GET, path, None, &[]).await
    }
}
