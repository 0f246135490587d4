//! The server must be the CA, not merely hold a name.
//!
//! Every identity's certificate carries DNS names with serverAuth, so a DNS
//! name alone cannot tell the CA from a workload: a workload named after the
//! CA's host would be taken for the CA and handed join tokens. The CA's own
//! certificate carries `spiffe://<td>/ns/meshca-system/sa/meshca`, a name no
//! workload can obtain (the namespace is reserved), so that is what is
//! checked, after the chain and host name checks of rustls's WebPKI
//! verifier.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// The SPIFFE ID path of the CA server.
pub const CA_SPIFFE_PATH: &str = "/ns/meshca-system/sa/meshca";

/// Why a server is not taken for the CA.
#[derive(Debug)]
pub struct NotTheCa(pub String);

impl std::fmt::Display for NotTheCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server is not the meshca CA: its certificate carries {}, not spiffe://<trust domain>{CA_SPIFFE_PATH}; check --server",
            self.0
        )
    }
}

impl std::error::Error for NotTheCa {}

/// The CA's SPIFFE ID check on top of WebPKI.
#[derive(Debug)]
pub(crate) struct CaVerifier {
    pub(crate) inner: Arc<WebPkiServerVerifier>,
    /// The trust domain the CA must be in, when the caller knows it.
    pub(crate) trust_domain: Option<String>,
}

/// The SPIFFE IDs (URI SANs starting `spiffe://`) of a certificate.
fn spiffe_ids(der: &[u8]) -> Vec<String> {
    match meshca_pki::describe(der, time::OffsetDateTime::now_utc()) {
        Ok(info) => info
            .uris
            .into_iter()
            .filter(|u| u.starts_with("spiffe://"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether `id` is the CA's SPIFFE ID (in `td`, when given).
pub(crate) fn is_ca_id(id: &str, td: Option<&str>) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((domain, path)) = rest.split_once('/') else {
        return false;
    };
    !domain.is_empty()
        && td.is_none_or(|t| t == domain)
        && CA_SPIFFE_PATH.strip_prefix('/') == Some(path)
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let ids = spiffe_ids(end_entity.as_ref());
        // Exactly one SPIFFE ID, and it is the CA's: a certificate with two
        // would be ambiguous about who it is.
        match ids.as_slice() {
            [one] if is_ca_id(one, self.trust_domain.as_deref()) => Ok(verified),
            [] => Err(not_the_ca("no SPIFFE ID".into())),
            more => Err(not_the_ca(more.join(", "))),
        }
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

fn not_the_ca(what: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NotTheCa(
        what,
    )))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_ca_id_is_the_ca() {
        assert!(is_ca_id(
            "spiffe://cluster.local/ns/meshca-system/sa/meshca",
            None
        ));
        assert!(is_ca_id(
            "spiffe://cluster.local/ns/meshca-system/sa/meshca",
            Some("cluster.local")
        ));
        for bad in [
            "spiffe://cluster.local/ns/meshca-system/sa/admin",
            "spiffe://cluster.local/ns/example/sa/ca",
            "spiffe://cluster.local/ns/meshca-system/sa/meshca/x",
            "spiffe:///ns/meshca-system/sa/meshca",
            "https://cluster.local/ns/meshca-system/sa/meshca",
        ] {
            assert!(!is_ca_id(bad, None), "{bad}");
        }
        assert!(!is_ca_id(
            "spiffe://other.td/ns/meshca-system/sa/meshca",
            Some("cluster.local")
        ));
    }
}
