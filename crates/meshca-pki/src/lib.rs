//! X.509 for meshca, and nothing else: keys, CSRs, identities, profiles,
//! durations, and building and checking certificates, chains and bundles.
//!
//! # Design
//! This crate does no I/O: it turns validated inputs into DER and DER back
//! into facts. Everything that decides what a certificate says lives here, in
//! one place ([`SigningCa::sign_leaf`]): the names come from the [`Identity`]
//! and the [`SanSet`] that policy built, never from a CSR, which is reduced to
//! its public key once its signature verifies ([`parse_csr`]). Signing uses
//! rcgen on aws-lc-rs; parsing uses x509-parser; chain checks use
//! rustls-webpki, the verifier rustls itself uses.
//!
//! # Example
//! ```
//! use meshca_pki::*;
//! use time::OffsetDateTime;
//!
//! let now = OffsetDateTime::now_utc();
//! let td = TrustDomain::default();
//! let ca_key = PrivateKey::generate(KeyType::EcdsaP256)?;
//! let ca_der = generate_root(&ca_key, &td, "example", DEFAULT_ROOT_TTL, now)?;
//! let ca = SigningCa::new(ca_der.clone(), ca_key, "root", now)?;
//!
//! let id = Identity::new("shop", "web")?;
//! let spec = LeafSpec {
//!     sans: SanSet::build(&id, &td, &[], &[])?,
//!     identity: id,
//!     trust_domain: td,
//!     profile: Profile::Service,
//!     ttl: check_ttl(None, Profile::Service, DEFAULT_ROOT_TTL)?,
//!     serial: Serial::random()?,
//! };
//! let key = PrivateKey::generate(KeyType::EcdsaP256)?;
//! let leaf = ca.sign_leaf(&LeafPublicKey::of(&key)?, &spec, now)?;
//! verify_chain(&[leaf.der.clone()], &[ca_der], now)?;
//! let info = describe(&leaf.der, now)?;
//! assert_eq!(info.spiffe_id.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/web"));
//! # Ok::<(), PkiError>(())
//! ```
#![forbid(unsafe_code)]

mod ca;
mod csr;
mod custody;
mod duration;
mod error;
mod identity;
mod inspect;
mod keys;
mod leaf;
mod profile;
mod seal;
mod serial;

pub use ca::{
    BACKDATE, DEFAULT_ROOT_TTL, RevokedEntry, SigningCa, check_ca_cert, check_signed_by,
    generate_intermediate, generate_root, intermediate_ttl, rfc3339,
};
pub use csr::{MAX_CSR_BYTES, VerifiedCsr, build_csr, csr_der, parse_csr};
pub use custody::{check_link, link_roots, reachable_roots};
pub use duration::{GoDuration, format_duration, humanize, parse_duration};
pub use error::PkiError;
pub use identity::{
    DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN, Identity, RESERVED_NAMESPACE, SanSet, TrustDomain,
    parse_ip, validate_dns_name, validate_label,
};
pub use inspect::{
    CertFacts, CertInfo, MAX_CERT_FILE_BYTES, bundle_fingerprint, cert_facts, cert_spki, describe,
    fingerprint, parse_certs, to_pem, verify_chain,
};
pub use keys::{KeyType, PrivateKey, key_type_of_spki};
pub use leaf::{IssuedLeaf, LeafPublicKey, LeafSpec, check_ttl};
pub use profile::Profile;

/// Compares two secrets (or their hashes) in time that does not depend on
/// where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    #[allow(deprecated)]
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `n` bytes from the system CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, PkiError> {
    let mut v = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut v).map_err(|_| PkiError::Random)?;
    Ok(v)
}
pub use seal::SealKey;
pub use serial::Serial;
