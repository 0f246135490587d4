//! Signing certificates: the [`Issuer`] trait, its built-in backend, and the
//! [`Authority`] that stands between callers and issuers.
//!
//! # Design
//! An [`Issuer`] only signs: given a public key and a [`LeafSpec`] that is
//! already decided, it returns the certificate and its chain, and it can say
//! what the trust bundle is. It is object-safe and held as `Arc<dyn Issuer>`,
//! so the built-in CA ([`BuiltinIssuer`], keys in 0600 files of the data
//! directory) and an upstream CA (Vault/OpenBao, later) are interchangeable.
//!
//! The [`Authority`] applies policy (trust domain, allowed names, maximum
//! lifetime), picks a fresh serial, has the issuer sign, and records the
//! certificate in the [`Store`](meshca_store::Store) before anyone sees it: a
//! certificate that was handed out is always in the store. Serial uniqueness is
//! enforced by the store's insert-if-absent; on the (2^-64) collision it signs
//! again with a new serial.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), meshca_issuer::IssuerError> {
//! use std::sync::Arc;
//! use meshca_issuer::*;
//! let dir = std::path::Path::new("./meshca-data");
//! let store = Arc::new(meshca_store::EmbeddedStore::open_existing(&dir.join("store.redb"))?);
//! let issuer = Arc::new(BuiltinIssuer::open(dir, store.clone(), None).await?);
//! let authority = Authority::new(issuer, store, Policy::default());
//! let issued = authority
//!     .issue(IssueRequest::new("default", "web")?.generate_key(meshca_pki::KeyType::EcdsaP256))
//!     .await?;
//! println!("{}", issued.certificate_pem);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod authority;
mod builtin;
mod error;
mod migrate;
mod policy;

use async_trait::async_trait;
use meshca_pki::{IssuedLeaf, LeafPublicKey, LeafSpec, RevokedEntry};

pub use authority::{Authority, DEFAULT_MAX_TTL, IssueRequest, Issued, KeySource, Policy};
pub use builtin::{
    ADMIN_NAME, ADMIN_NAMESPACE, BuiltinIssuer, DataDir, ImportSpec, InitOptions, InitReport,
    SHARED_CONFIG_BLOB, init_data_dir, init_shared,
};
pub use error::IssuerError;
pub use migrate::{CaPlace, CopyReport, copy_ca, verify_copy};
pub use policy::{PolicyRule, check_workload};

/// A signed leaf with the chain that goes with it.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The leaf.
    pub leaf: IssuedLeaf,
    /// The intermediates, leaf's issuer first (DER).
    pub chain: Vec<Vec<u8>>,
    /// Which hierarchy signed it.
    pub hierarchy_id: String,
}

/// Something that signs leaves. See the crate docs.
#[async_trait]
pub trait Issuer: std::fmt::Debug + Send + Sync {
    /// A short name for status output (`builtin`, `vault`).
    fn kind(&self) -> &'static str;

    /// Signs a leaf for `key` as `spec` says.
    async fn sign(&self, key: &LeafPublicKey, spec: &LeafSpec) -> Result<Signed, IssuerError>;

    /// The roots clients should trust (DER), current ones first.
    async fn trust_bundle(&self) -> Result<Vec<Vec<u8>>, IssuerError>;

    /// A CRL (DER) of the issuing CA listing `revoked`, valid for `validity`.
    async fn crl(
        &self,
        revoked: Vec<RevokedEntry>,
        crl_number: u64,
        validity: std::time::Duration,
    ) -> Result<Vec<u8>, IssuerError>;

    /// The issuing CA certificate (DER) and its notAfter, for status.
    fn issuing_ca(&self) -> (Vec<u8>, time::OffsetDateTime);
}
