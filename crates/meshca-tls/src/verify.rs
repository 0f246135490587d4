//! Certificate verifiers: the server's client verifier with an allow-list,
//! and the client's server verifier that checks a SPIFFE ID or DNS name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{PeerIdentity, PeerMatcher};

/// Wraps rustls's WebPKI client verifier and refuses, during the handshake,
/// a client whose identity is not on the allow-list.
#[derive(Debug)]
pub(crate) struct AllowListVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) allow: Vec<PeerMatcher>,
    /// Revocation must be checked and there are no CRLs to check it with.
    pub(crate) no_revocation_info: bool,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.no_revocation_info {
            tracing::warn!(
                "refused a client certificate: revocation must be checked (fail-closed) and ca.crl holds no CRL"
            );
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownRevocationStatus,
            ));
        }
        let identity = PeerIdentity::from_der(end_entity).ok_or(
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        )?;
        if !identity.allowed_by(&self.allow) {
            tracing::warn!(peer = %identity, "refused a client outside the allow-list");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What a client expects the server to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdentity {
    /// A DNS name among the server certificate's SANs (normal hostname check).
    Dns(String),
    /// A SPIFFE ID, exact or every ID below a path (`spiffe://td/ns/shop/*`),
    /// with the rules of an allow rule ([`PeerMatcher`]).
    Spiffe(PeerMatcher),
}

impl ServerIdentity {
    /// `spiffe://...` is a SPIFFE ID, exact or ending in `/*` (validated as
    /// an allow rule is); anything else is a DNS name (or an IP address),
    /// matched exactly. Wildcards and raw prefixes are refused.
    pub fn parse(s: &str) -> Result<Self, crate::TlsError> {
        // Anything that looks like a URI goes through the SPIFFE rules, so
        // that `SPIFFE://...` or `https://...` is refused with the forms
        // allowed rather than as a strange DNS name.
        let uri_like = s.contains("://")
            || s.get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("spiffe:"));
        if uri_like {
            Ok(ServerIdentity::Spiffe(PeerMatcher::parse(
                s,
                "server identity",
            )?))
        } else {
            meshca_pki::validate_dns_name(s)
                .map(ServerIdentity::Dns)
                .map_err(|e| crate::TlsError::Config(e.to_string()))
        }
    }
}

/// Verifies the server's chain against the bundle, then its identity.
#[derive(Debug)]
pub(crate) struct IdentityServerVerifier {
    pub(crate) roots: Vec<rustls_pki_types::TrustAnchor<'static>>,
    pub(crate) expected: ServerIdentity,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                webpki::Error::CertExpired { .. } => CertificateError::Expired,
                webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
                _ => CertificateError::BadSignature,
            })
        })?;
        match &self.expected {
            ServerIdentity::Dns(name) => {
                let name = ServerName::try_from(name.as_str()).map_err(|_| {
                    rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                })?;
                cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
                    rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                })?;
            }
            ServerIdentity::Spiffe(rule) => {
                let id = PeerIdentity::from_der(end_entity).ok_or(
                    rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
                )?;
                if !rule.matches(id.spiffe_id.as_deref(), &[]) {
                    return Err(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName,
                    ));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn server_identities_follow_the_allow_rules() {
        assert!(matches!(
            ServerIdentity::parse("spiffe://cluster.local/ns/data/sa/db").unwrap(),
            ServerIdentity::Spiffe(_)
        ));
        let ServerIdentity::Spiffe(ns) =
            ServerIdentity::parse("spiffe://cluster.local/ns/data/*").unwrap()
        else {
            panic!("not a SPIFFE rule");
        };
        assert!(ns.matches(Some("spiffe://cluster.local/ns/data/sa/db"), &[]));
        assert!(!ns.matches(Some("spiffe://cluster.local/ns/database/sa/db"), &[]));
        assert_eq!(
            ServerIdentity::parse("db.data.svc").unwrap(),
            ServerIdentity::Dns("db.data.svc".into())
        );
        for (bad, why) in [
            ("spiffe://cluster.local/ns/data*", "whole path segment, /*"),
            ("spiffe://cluster.local/ns/../sa/db", "\"..\""),
            ("SPIFFE://cluster.local/ns/data/sa/db", "spiffe://"),
            ("https://db.data.svc", "only spiffe://"),
            ("*.data.svc", "wildcards"),
            ("db*", "wildcards"),
        ] {
            let e = ServerIdentity::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = ServerIdentity::parse("spiffe://cluster.local/ns/data*")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid server identity"), "{e}");
    }
}
