//! Key types, private keys and the public keys meshca accepts.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use rcgen::{KeyPair, PublicKeyData, RsaKeySize, SignatureAlgorithm};
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::PkiError;

/// The key types meshca generates and accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA, 2048-bit modulus, PKCS#1 v1.5 with SHA-256.
    Rsa2048,
    /// RSA, 3072-bit modulus.
    Rsa3072,
    /// RSA, 4096-bit modulus.
    Rsa4096,
}

impl KeyType {
    /// Every key type.
    pub const ALL: [KeyType; 6] = [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Ed25519,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    /// The name as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    /// Whether this is an RSA key (which also gets keyEncipherment).
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096)
    }

    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = PkiError;
    /// Accepts the canonical names and the usual short forms (`p256`, `ec`,
    /// `rsa2048`, `rsa` for 2048 bits).
    fn from_str(s: &str) -> Result<Self, PkiError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "p256" | "p-256" | "ec" | "ecdsa" | "ecdsa-p-256" => KeyType::EcdsaP256,
            "ecdsa-p384" | "p384" | "p-384" | "ecdsa-p-384" => KeyType::EcdsaP384,
            "ed25519" => KeyType::Ed25519,
            "rsa-2048" | "rsa2048" | "rsa" => KeyType::Rsa2048,
            "rsa-3072" | "rsa3072" => KeyType::Rsa3072,
            "rsa-4096" | "rsa4096" => KeyType::Rsa4096,
            _ => return Err(PkiError::UnknownKeyType(s.to_owned())),
        })
    }
}

impl TryFrom<String> for KeyType {
    type Error = PkiError;
    fn try_from(s: String) -> Result<Self, PkiError> {
        s.parse()
    }
}

impl From<KeyType> for String {
    fn from(k: KeyType) -> String {
        k.as_str().to_owned()
    }
}

/// A private key. Its `Debug` never prints key material.
///
/// An EC key the CA generates for a workload is only ever written out, never
/// used to sign: it is kept as its PKCS#8 document and public key, and the
/// signing form (rcgen's `KeyPair`, whose parse checks the key again with a
/// second scalar multiplication, as long as the generation itself) is made
/// only when something signs with it. Half the cost of an issuance's key.
pub struct PrivateKey {
    key_type: KeyType,
    pkcs8: Vec<u8>,
    spki: Vec<u8>,
    pair: OnceLock<KeyPair>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    fn of_pair(pair: KeyPair, key_type: KeyType) -> Self {
        PrivateKey {
            key_type,
            pkcs8: pair.serialized_der().to_vec(),
            spki: pair.subject_public_key_info(),
            pair: OnceLock::from(pair),
        }
    }

    /// Generates a fresh key of the given type.
    pub fn generate(key_type: KeyType) -> Result<Self, PkiError> {
        let ec = match key_type {
            KeyType::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            KeyType::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            KeyType::Rsa2048 => return Self::generate_rsa(key_type, RsaKeySize::_2048),
            KeyType::Rsa3072 => return Self::generate_rsa(key_type, RsaKeySize::_3072),
            KeyType::Rsa4096 => return Self::generate_rsa(key_type, RsaKeySize::_4096),
            KeyType::Ed25519 => {
                let pair =
                    KeyPair::generate_for(key_type.algorithm()).map_err(crate::error::signing)?;
                return Ok(Self::of_pair(pair, key_type));
            }
        };
        let failed = |what: &str| PkiError::Signing(format!("EC key generation failed ({what})"));
        let pair = EcdsaKeyPair::generate(ec).map_err(|_| failed("generate"))?;
        let pkcs8 = pair.to_pkcs8v1().map_err(|_| failed("PKCS#8"))?;
        let spki: PublicKeyX509Der<'_> = pair
            .public_key()
            .as_der()
            .map_err(|_| failed("public key"))?;
        Ok(PrivateKey {
            key_type,
            pkcs8: pkcs8.as_ref().to_vec(),
            spki: spki.as_ref().to_vec(),
            pair: OnceLock::new(),
        })
    }

    fn generate_rsa(key_type: KeyType, size: RsaKeySize) -> Result<Self, PkiError> {
        let pair =
            KeyPair::generate_rsa_for(key_type.algorithm(), size).map_err(crate::error::signing)?;
        Ok(Self::of_pair(pair, key_type))
    }

    /// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1) of a supported type.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let pair = KeyPair::from_pem(pem).map_err(|e| PkiError::MalformedKey(e.to_string()))?;
        let key_type = key_type_of_spki(&pair.subject_public_key_info())?;
        Ok(Self::of_pair(pair, key_type))
    }

    /// The form that signs, made on first use.
    pub(crate) fn pair(&self) -> Result<&KeyPair, PkiError> {
        if let Some(pair) = self.pair.get() {
            return Ok(pair);
        }
        let _ = self.pair.set(self.parse_pair()?);
        self.pair
            .get()
            .ok_or_else(|| PkiError::Signing("the key could not be loaded".into()))
    }

    /// The form that signs, owned.
    pub(crate) fn into_pair(mut self) -> Result<KeyPair, PkiError> {
        match self.pair.take() {
            Some(pair) => Ok(pair),
            None => self.parse_pair(),
        }
    }

    fn parse_pair(&self) -> Result<KeyPair, PkiError> {
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(self.pkcs8.as_slice()),
            self.key_type.algorithm(),
        )
        .map_err(crate::error::signing)
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// PKCS#8 PEM. This is secret: write it only to a 0600 file.
    ///
    /// Ed25519 keys are written as PKCS#8 v1 (RFC 8410), which every TLS stack
    /// reads: aws-lc emits v2 (with the public key appended), which OpenSSL
    /// 3.0 refuses to load.
    pub fn to_pem(&self) -> String {
        let der = self.pkcs8.as_slice();
        let der = match self.key_type {
            KeyType::Ed25519 => ed25519_pkcs8_v1(der).unwrap_or_else(|| der.to_vec()),
            _ => der.to_vec(),
        };
        pem::encode_config(
            &pem::Pem::new("PRIVATE KEY", der),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.spki.clone()
    }
}

/// The PKCS#8 v1 prefix of an Ed25519 key: SEQUENCE { INTEGER 0,
/// AlgorithmIdentifier { id-Ed25519 }, OCTET STRING { OCTET STRING (32) } }.
const ED25519_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Rewrites an Ed25519 PKCS#8 v2 document (RFC 5958, as aws-lc writes it) as
/// v1 by keeping only the 32-byte seed. `None` when the input is not in the
/// expected shape (the caller keeps it as it is).
fn ed25519_pkcs8_v1(der: &[u8]) -> Option<Vec<u8>> {
    // v2: SEQUENCE (0x51) { INTEGER 1, AlgorithmIdentifier, OCTET STRING { OCTET STRING (32) }, [1] pub }
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    if der.starts_with(&ED25519_V1_PREFIX) {
        return Some(der.to_vec());
    }
    let seed = der.strip_prefix(&V2_PREFIX)?.get(..32)?;
    let mut out = ED25519_V1_PREFIX.to_vec();
    out.extend_from_slice(seed);
    Some(out)
}

/// Reads the key type from a DER SubjectPublicKeyInfo, refusing what meshca
/// does not issue for: RSA below 2048 bits or of an odd size, curves other
/// than P-256 and P-384, and unknown algorithms.
pub fn key_type_of_spki(spki_der: &[u8]) -> Result<KeyType, PkiError> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| PkiError::RejectedKey(format!("unparsable public key: {e}")))?;
    key_type_of(&spki)
}

pub(crate) fn key_type_of(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyType, PkiError> {
    let parsed = spki
        .parsed()
        .map_err(|e| PkiError::RejectedKey(format!("unparsable public key: {e}")))?;
    match parsed {
        PublicKey::RSA(rsa) => match rsa.key_size() {
            n if n < 2048 => Err(PkiError::RejectedKey(format!(
                "RSA key of {n} bits; at least 2048 bits are required"
            ))),
            2048 => Ok(KeyType::Rsa2048),
            3072 => Ok(KeyType::Rsa3072),
            4096 => Ok(KeyType::Rsa4096),
            n => Err(PkiError::RejectedKey(format!(
                "RSA key of {n} bits; use 2048, 3072 or 4096"
            ))),
        },
        PublicKey::EC(_) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => Ok(KeyType::EcdsaP256),
                Some("1.3.132.0.34") => Ok(KeyType::EcdsaP384),
                other => Err(PkiError::RejectedKey(format!(
                    "elliptic curve {} not supported; use P-256 or P-384",
                    other.unwrap_or("(none given)")
                ))),
            }
        }
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(KeyType::Ed25519),
        _ => Err(PkiError::RejectedKey(format!(
            "algorithm {} not supported; use ECDSA P-256/P-384, Ed25519 or RSA",
            spki.algorithm.algorithm.to_id_string()
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_key_type_generates_and_round_trips() {
        for kt in KeyType::ALL {
            let k = PrivateKey::generate(kt).unwrap();
            assert_eq!(k.key_type(), kt);
            let again = PrivateKey::from_pem(&k.to_pem()).unwrap();
            assert_eq!(again.key_type(), kt);
            assert_eq!(again.public_key_der(), k.public_key_der());
            assert_eq!(key_type_of_spki(&k.public_key_der()).unwrap(), kt);
            assert!(!format!("{k:?}").contains("BEGIN"));
            // The signing form, made on first use, belongs to the public key
            // the key reports: a CSR it signs verifies against it.
            let csr = crate::csr::parse_csr(&crate::csr::build_csr(&k).unwrap()).unwrap();
            assert_eq!(
                csr.public_key().subject_public_key_info(),
                k.public_key_der(),
                "{kt}"
            );
        }
    }

    #[test]
    fn key_type_names() {
        for kt in KeyType::ALL {
            assert_eq!(kt.as_str().parse::<KeyType>().unwrap(), kt);
        }
        assert!(
            "dsa"
                .parse::<KeyType>()
                .unwrap_err()
                .to_string()
                .contains("dsa")
        );
        assert!(PrivateKey::from_pem("not a key").is_err());
    }
}
