//! Who is on the other end of a connection.

use std::fmt;

use serde::Serialize;

use crate::PeerMatcher;

/// The verified identity of a peer, read from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerIdentity {
    /// The SPIFFE ID (URI SAN), if the certificate has one.
    pub spiffe_id: Option<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// The certificate's serial, hex.
    pub serial: String,
    /// The SHA-256 of the whole certificate (hex): what a CA compares with
    /// its record, since a serial alone can be minted by any other CA under
    /// the same root.
    pub fingerprint: String,
}

impl PeerIdentity {
    /// Reads the identity of a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let info = meshca_pki::describe(der, time::OffsetDateTime::now_utc()).ok()?;
        // An X.509 SVID names one SPIFFE ID. With several, which one the
        // peer is cannot be told (the first was taken, and matched against
        // the allow-list), so it is known by none of them.
        let spiffe_ids = info
            .uris
            .iter()
            .filter(|u| u.starts_with("spiffe://"))
            .count();
        Some(PeerIdentity {
            spiffe_id: info.spiffe_id.filter(|_| spiffe_ids == 1),
            dns_names: info.dns_names,
            serial: info.serial,
            fingerprint: meshca_pki::fingerprint(der),
        })
    }

    /// Whether any rule of `allow` matches (an empty list allows everyone).
    pub fn allowed_by(&self, allow: &[PeerMatcher]) -> bool {
        allow.is_empty()
            || allow
                .iter()
                .any(|m| m.matches(self.spiffe_id.as_deref(), &self.dns_names))
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.spiffe_id, self.dns_names.first()) {
            (Some(id), _) => f.write_str(id),
            (None, Some(dns)) => write!(f, "dns:{dns}"),
            (None, None) => write!(f, "serial:{}", self.serial),
        }
    }
}

/// Why a connection has no verified peer identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoPeerIdentity {
    /// The listener does not do TLS.
    TlsOff,
    /// The client spoke plaintext (permissive mode).
    Plaintext,
    /// TLS without a client certificate (tls mode, or permissive without one).
    NoClientCertificate,
}

impl NoPeerIdentity {
    /// A short label, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NoPeerIdentity::TlsOff => "tls_off",
            NoPeerIdentity::Plaintext => "plaintext",
            NoPeerIdentity::NoClientCertificate => "no_client_certificate",
        }
    }
}

impl fmt::Display for NoPeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a handler learns about its connection: TLS or not, and who.
/// Inserted into every request's extensions by [`serve`](crate::serve); in
/// axum, take it with `Extension<Peer>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The verified identity, or why there is none.
    pub identity: Result<PeerIdentity, NoPeerIdentity>,
}

impl Peer {
    /// The verified identity, if any.
    pub fn identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_ref().ok()
    }

    /// The identity as text, or `anonymous`.
    pub fn describe(&self) -> String {
        match &self.identity {
            Ok(id) => id.to_string(),
            Err(_) => "anonymous".to_owned(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A self-signed certificate with these URI SANs and the DNS name
    /// `web.shop.svc`: names as some other CA in a bundle might write them.
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .collect();
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName("web.shop.svc".try_into().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_with_two_spiffe_ids_is_known_by_neither() {
        let shop = [PeerMatcher::new("spiffe://td/ns/shop/*").unwrap()];
        let one = PeerIdentity::from_der(&cert_with_uris(&["spiffe://td/ns/shop/sa/web"])).unwrap();
        assert_eq!(one.spiffe_id.as_deref(), Some("spiffe://td/ns/shop/sa/web"));
        assert!(one.allowed_by(&shop));
        // Another kind of URI beside the SPIFFE ID changes nothing.
        let other = PeerIdentity::from_der(&cert_with_uris(&[
            "https://example.com/web",
            "spiffe://td/ns/shop/sa/web",
        ]))
        .unwrap();
        assert_eq!(
            other.spiffe_id.as_deref(),
            Some("spiffe://td/ns/shop/sa/web")
        );
        let two = PeerIdentity::from_der(&cert_with_uris(&[
            "spiffe://td/ns/shop/sa/web",
            "spiffe://td/ns/bank/sa/teller",
        ]))
        .unwrap();
        assert_eq!(two.spiffe_id, None);
        assert!(!two.allowed_by(&shop));
        // Its DNS name still names it.
        assert!(two.allowed_by(&[PeerMatcher::new("web.shop.svc").unwrap()]));
    }
}
