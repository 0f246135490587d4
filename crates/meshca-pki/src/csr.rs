//! Certificate signing requests: parse, verify, and keep only the public key.
//!
//! A CSR proves possession of a key and nothing else. Its subject, SANs and
//! requested extensions are read by nobody: the names in an issued certificate
//! come from the identity and the caller's flags, which policy has checked.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::PkiError;
use crate::keys::{KeyType, PrivateKey, key_type_of};
use crate::leaf::LeafPublicKey;

/// Largest CSR accepted, PEM or DER. A P-256 CSR is under 1 KiB and an RSA-4096
/// one under 2 KiB; anything near this is not a CSR.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// A CSR whose signature verified, reduced to its public key.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    key: LeafPublicKey,
    der: Vec<u8>,
}

impl VerifiedCsr {
    /// The public key to certify.
    pub fn public_key(&self) -> &LeafPublicKey {
        &self.key
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key.key_type()
    }

    /// The CSR itself (DER), for an upstream CA that wants the request.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
}

/// Builds a minimal CSR (no subject, no extensions) signed by `key`: all a
/// meshca CA reads from a CSR is the proof of possession of the key.
pub fn build_csr(key: &PrivateKey) -> Result<Vec<u8>, PkiError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(key.pair()?)
        .map_err(crate::error::signing)?;
    Ok(csr.der().to_vec())
}

/// Turns PEM (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`) or DER into
/// DER, refusing oversized input.
pub fn csr_der(input: &[u8]) -> Result<Vec<u8>, PkiError> {
    if input.len() > MAX_CSR_BYTES {
        return Err(PkiError::MalformedCsr(format!(
            "{} bytes, more than the {MAX_CSR_BYTES} allowed",
            input.len()
        )));
    }
    let trimmed = input.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        let block =
            pem::parse(trimmed).map_err(|e| PkiError::MalformedCsr(format!("bad PEM: {e}")))?;
        match block.tag() {
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Ok(block.into_contents()),
            other => Err(PkiError::MalformedCsr(format!(
                "PEM block is {other:?}, not \"CERTIFICATE REQUEST\""
            ))),
        }
    } else if trimmed.first() == Some(&0x30) {
        Ok(input.to_vec())
    } else {
        Err(PkiError::MalformedCsr("neither PEM nor DER".into()))
    }
}

/// Parses a CSR, checks its signature with the key it carries and checks that
/// key against policy (RSA at least 2048 bits, P-256/P-384, Ed25519).
pub fn parse_csr(input: &[u8]) -> Result<VerifiedCsr, PkiError> {
    let der = csr_der(input)?;
    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| PkiError::MalformedCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::MalformedCsr(format!(
            "{} bytes of trailing data",
            rest.len()
        )));
    }
    // Policy on the key comes first so that a weak key gets the clearer error.
    let spki = &csr.certification_request_info.subject_pki;
    let key_type = key_type_of(spki)?;
    csr.verify_signature()
        .map_err(|_| PkiError::BadCsrSignature)?;
    let key = LeafPublicKey::from_spki_der(spki.raw, key_type)?;
    Ok(VerifiedCsr { key, der })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn csr_for(kt: KeyType) -> (String, Vec<u8>) {
        let key = PrivateKey::generate(kt).unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["evil.example.com".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "admin");
        let csr = params.serialize_request(key.pair().unwrap()).unwrap();
        (csr.pem().unwrap(), csr.der().to_vec())
    }

    #[test]
    fn accepts_pem_and_der_of_every_key_type() {
        for kt in [
            KeyType::EcdsaP256,
            KeyType::EcdsaP384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
        ] {
            let (pem, der) = csr_for(kt);
            assert_eq!(parse_csr(pem.as_bytes()).unwrap().key_type(), kt);
            assert_eq!(parse_csr(&der).unwrap().key_type(), kt);
        }
    }

    #[test]
    fn built_csrs_parse() {
        for kt in [KeyType::EcdsaP256, KeyType::Ed25519, KeyType::Rsa2048] {
            let key = PrivateKey::generate(kt).unwrap();
            let csr = parse_csr(&build_csr(&key).unwrap()).unwrap();
            assert_eq!(csr.key_type(), kt);
        }
    }

    #[test]
    fn broken_signature_is_refused() {
        let (_, mut der) = csr_for(KeyType::EcdsaP256);
        let n = der.len();
        der[n - 5] ^= 0x01;
        let e = parse_csr(&der).unwrap_err();
        assert!(
            matches!(e, PkiError::BadCsrSignature | PkiError::MalformedCsr(_)),
            "{e}"
        );
        // Flip a bit in the signed part (the subject) instead.
        let (_, mut der) = csr_for(KeyType::EcdsaP256);
        let pos = der.windows(5).position(|w| w == b"admin").unwrap();
        der[pos] = b'b';
        assert_eq!(parse_csr(&der).unwrap_err(), PkiError::BadCsrSignature);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            parse_csr(b"hello"),
            Err(PkiError::MalformedCsr(_))
        ));
        assert!(matches!(
            parse_csr(&[0x30, 0x03, 1, 2, 3]),
            Err(PkiError::MalformedCsr(_))
        ));
        assert!(matches!(
            parse_csr(&vec![0x30; MAX_CSR_BYTES + 1]),
            Err(PkiError::MalformedCsr(_))
        ));
        let cert_pem = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        let e = parse_csr(cert_pem.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("CERTIFICATE REQUEST"), "{e}");
    }
}
