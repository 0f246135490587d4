//! Reading certificates back: what `meshca inspect` prints, and chain checks.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::PkiError;
use crate::ca::rfc3339;
use crate::duration::humanize;
use crate::keys::key_type_of;
use crate::serial::Serial;

/// Largest certificate file `parse_certs` accepts.
pub const MAX_CERT_FILE_BYTES: usize = 1024 * 1024;

/// The SHA-256 fingerprint of DER bytes, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

/// The DER SubjectPublicKeyInfo of a certificate (to match it with a key).
pub fn cert_spki(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, x) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::MalformedCertificate(e.to_string()))?;
    Ok(x.public_key().raw.to_vec())
}

/// What a store record needs from a certificate signed elsewhere (an
/// upstream CA): its serial and validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The serial number.
    pub serial: Serial,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// The subject public key bits (to match a key).
    pub public_key: Vec<u8>,
    /// Whether subject and issuer are the same and it is a CA (a root).
    pub self_signed: bool,
}

/// Reads [`CertFacts`] from a DER certificate.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts, PkiError> {
    let (_, x) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::MalformedCertificate(e.to_string()))?;
    Ok(CertFacts {
        serial: Serial::from_bytes(x.raw_serial()),
        not_before: x.validity().not_before.to_datetime(),
        not_after: x.validity().not_after.to_datetime(),
        public_key: x.public_key().subject_public_key.data.to_vec(),
        self_signed: x.subject().as_raw() == x.issuer().as_raw() && x.is_ca(),
    })
}

/// Encodes DER as PEM with the given tag (`CERTIFICATE`).
pub fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Reads one or more certificates: PEM (every `CERTIFICATE` block, in order;
/// other blocks are skipped) or a single DER certificate. Each one must parse.
pub fn parse_certs(input: &[u8]) -> Result<Vec<Vec<u8>>, PkiError> {
    if input.len() > MAX_CERT_FILE_BYTES {
        return Err(PkiError::MalformedCertificate(format!(
            "{} bytes, more than the {MAX_CERT_FILE_BYTES} allowed",
            input.len()
        )));
    }
    let trimmed = input.trim_ascii_start();
    let ders: Vec<Vec<u8>> = if trimmed.starts_with(b"-----BEGIN") {
        let blocks = pem::parse_many(trimmed)
            .map_err(|e| PkiError::MalformedCertificate(format!("bad PEM: {e}")))?;
        blocks
            .into_iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect()
    } else if trimmed.first() == Some(&0x30) {
        vec![input.to_vec()]
    } else if trimmed.is_empty() {
        return Err(PkiError::MalformedCertificate("the input is empty".into()));
    } else {
        return Err(PkiError::MalformedCertificate("neither PEM nor DER".into()));
    };
    if ders.is_empty() {
        return Err(PkiError::MalformedCertificate(
            "no CERTIFICATE block in the PEM input".into(),
        ));
    }
    for (i, der) in ders.iter().enumerate() {
        let (rest, _) = X509Certificate::from_der(der)
            .map_err(|e| PkiError::MalformedCertificate(format!("certificate #{}: {e}", i + 1)))?;
        if !rest.is_empty() {
            return Err(PkiError::MalformedCertificate(format!(
                "certificate #{}: trailing data",
                i + 1
            )));
        }
    }
    Ok(ders)
}

/// What a certificate says, for people (`meshca inspect`) and scripts (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial, lower-case hex.
    pub serial: String,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<String>,
    /// URI SANs.
    pub uris: Vec<String>,
    /// The SPIFFE ID among the URIs, if any.
    pub spiffe_id: Option<String>,
    /// Key type (`ecdsa-p256`, ...), or a description when meshca does not issue it.
    pub key_type: String,
    /// Signature algorithm OID name.
    pub signature_algorithm: String,
    /// basicConstraints CA.
    pub is_ca: bool,
    /// basicConstraints pathLen.
    pub path_len: Option<u32>,
    /// keyUsage bits by name.
    pub key_usage: Vec<String>,
    /// extendedKeyUsage by name.
    pub extended_key_usage: Vec<String>,
    /// The meshca profile these usages match (`service`, `server`, `client`, `ca`).
    pub profile: Option<String>,
    /// notBefore, RFC 3339.
    pub not_before: String,
    /// notAfter, RFC 3339.
    pub not_after: String,
    /// Whether notAfter has passed.
    pub expired: bool,
    /// Seconds until notAfter (negative once expired).
    pub seconds_left: i64,
    /// The time left (or since expiry) in words.
    pub time_left: String,
    /// SHA-256 fingerprint of the DER, lower-case hex.
    pub fingerprint_sha256: String,
    /// Whether subject and issuer are the same.
    pub self_signed: bool,
}

/// Describes one DER certificate as of `now`.
pub fn describe(der: &[u8], now: OffsetDateTime) -> Result<CertInfo, PkiError> {
    let (_, x) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::MalformedCertificate(e.to_string()))?;
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::IPAddress(b) => ip_addresses.push(ip_text(b)),
                _ => {}
            }
        }
    }
    let spiffe_id = uris.iter().find(|u| u.starts_with("spiffe://")).cloned();
    let key_type = match key_type_of(x.public_key()) {
        Ok(kt) => kt.to_string(),
        Err(e) => format!("unsupported ({e})"),
    };
    let (is_ca, path_len) = match x.basic_constraints() {
        Ok(Some(bc)) => (bc.value.ca, bc.value.path_len_constraint),
        _ => (false, None),
    };
    let mut key_usage = Vec::new();
    if let Ok(Some(ku)) = x.key_usage() {
        let ku = ku.value;
        for (set, name) in [
            (ku.digital_signature(), "digitalSignature"),
            (ku.non_repudiation(), "contentCommitment"),
            (ku.key_encipherment(), "keyEncipherment"),
            (ku.data_encipherment(), "dataEncipherment"),
            (ku.key_agreement(), "keyAgreement"),
            (ku.key_cert_sign(), "keyCertSign"),
            (ku.crl_sign(), "cRLSign"),
            (ku.encipher_only(), "encipherOnly"),
            (ku.decipher_only(), "decipherOnly"),
        ] {
            if set {
                key_usage.push(name.to_owned());
            }
        }
    }
    let mut extended_key_usage = Vec::new();
    let (mut server, mut client) = (false, false);
    if let Ok(Some(eku)) = x.extended_key_usage() {
        let eku = eku.value;
        server = eku.server_auth;
        client = eku.client_auth;
        for (set, name) in [
            (eku.any, "any"),
            (eku.server_auth, "serverAuth"),
            (eku.client_auth, "clientAuth"),
            (eku.code_signing, "codeSigning"),
            (eku.email_protection, "emailProtection"),
            (eku.time_stamping, "timeStamping"),
            (eku.ocsp_signing, "OCSPSigning"),
        ] {
            if set {
                extended_key_usage.push(name.to_owned());
            }
        }
        extended_key_usage.extend(eku.other.iter().map(|o| o.to_id_string()));
    }
    let profile = match (is_ca, server, client) {
        (true, _, _) => Some("ca"),
        (false, true, true) => Some("service"),
        (false, true, false) => Some("server"),
        (false, false, true) => Some("client"),
        _ => None,
    }
    .map(str::to_owned);
    let not_before = x.validity().not_before.to_datetime();
    let not_after = x.validity().not_after.to_datetime();
    let left = not_after - now;
    let seconds_left = left.whole_seconds();
    let span = Duration::from_secs(seconds_left.unsigned_abs());
    let time_left = if seconds_left > 0 {
        format!("{} left", humanize(span))
    } else {
        format!("expired {} ago", humanize(span))
    };
    let sig_oid = x.signature_algorithm.algorithm.to_id_string();
    Ok(CertInfo {
        subject: x.subject().to_string(),
        issuer: x.issuer().to_string(),
        serial: Serial::from_bytes(x.raw_serial()).to_hex(),
        dns_names,
        ip_addresses,
        uris,
        spiffe_id,
        key_type,
        signature_algorithm: signature_name(&sig_oid).unwrap_or(&sig_oid).to_owned(),
        is_ca,
        path_len,
        key_usage,
        extended_key_usage,
        profile,
        not_before: rfc3339(not_before),
        not_after: rfc3339(not_after),
        expired: seconds_left <= 0,
        seconds_left,
        time_left,
        fingerprint_sha256: fingerprint(der),
        self_signed: x.subject() == x.issuer(),
    })
}

fn signature_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.3.101.112" => "ed25519",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        _ => return None,
    })
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => {
            let a: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
            std::net::IpAddr::from(a).to_string()
        }
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            std::net::IpAddr::from(a).to_string()
        }
        _ => hex::encode(bytes),
    }
}

/// Verifies `chain` (the certificate first, then intermediates) against the
/// trust bundle `roots` at `now`.
///
/// A leaf goes through rustls-webpki, the verifier rustls uses, so a pass here
/// means a rustls peer accepts it (for server or client authentication). A CA
/// certificate is checked link by link (issuer name and signature) up to a
/// root of the bundle.
pub fn verify_chain(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: OffsetDateTime,
) -> Result<(), PkiError> {
    let Some(first) = chain.first() else {
        return Err(PkiError::ChainInvalid("no certificate given".into()));
    };
    if roots.is_empty() {
        return Err(PkiError::ChainInvalid("the trust bundle is empty".into()));
    }
    let (_, x) = X509Certificate::from_der(first)
        .map_err(|e| PkiError::MalformedCertificate(e.to_string()))?;
    let is_ca = matches!(x.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if is_ca {
        return verify_ca_links(chain, roots, now);
    }
    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .map(|a| a.to_owned())
                .map_err(|e| PkiError::ChainInvalid(format!("bad root in the bundle: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = CertificateDer::from(first.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| PkiError::ChainInvalid(format!("{e:?}")))?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let time = UnixTime::since_unix_epoch(Duration::from_secs(secs));
    let mut last = None;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        match ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            time,
            usage,
            None,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(PkiError::ChainInvalid(format!(
        "{:?}",
        last.map_or_else(|| "unknown".to_owned(), |e| format!("{e}"))
    )))
}

fn verify_ca_links(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: OffsetDateTime,
) -> Result<(), PkiError> {
    let mut current = chain[0].clone();
    for _ in 0..8 {
        crate::ca::check_ca_cert(&current, "certificate", now)
            .map_err(|e| PkiError::ChainInvalid(e.to_string()))?;
        if roots.contains(&current) {
            return Ok(());
        }
        let parent = chain.iter().chain(roots.iter()).find(|p| {
            **p != current && crate::ca::check_signed_by(&current, p, "certificate").is_ok()
        });
        match parent {
            Some(p) => current = p.clone(),
            None => {
                return Err(PkiError::ChainInvalid(
                    "no issuer in the chain or the bundle signed it".into(),
                ));
            }
        }
    }
    Err(PkiError::ChainInvalid("chain longer than 8".into()))
}

/// A fingerprint of a trust bundle as a set: SHA-256 over the sorted
/// SHA-256 of each root, so that order and PEM formatting do not matter.
/// Agents report it; the CA compares it with its own bundle's.
pub fn bundle_fingerprint(roots: &[Vec<u8>]) -> String {
    let mut each: Vec<[u8; 32]> = roots.iter().map(|r| crate::sha256(r)).collect();
    each.sort_unstable();
    each.dedup();
    hex::encode(crate::sha256(&each.concat()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod bundle_fingerprint_tests {
    #[test]
    fn order_and_duplicates_do_not_matter() {
        let (a, b) = (vec![1u8, 2, 3], vec![4u8, 5]);
        let one = super::bundle_fingerprint(&[a.clone(), b.clone()]);
        assert_eq!(
            one,
            super::bundle_fingerprint(&[b.clone(), a.clone(), b.clone()])
        );
        assert_ne!(one, super::bundle_fingerprint(&[a]));
        assert_eq!(one.len(), 64);
    }
}
