//! Signing certificates: the [`Issuer`] trait, its built-in backend, and the
//! [`Authority`] that stands between callers and issuers.
//!
//! # Design
//! An [`Issuer`] only signs: given the key (a verified CSR, or "generate
//! one") and a [`LeafSpec`] that is already decided, it returns the
//! certificate and its chain, and it can say what the trust bundle is. It is
//! object-safe and held as `Arc<dyn Issuer>`, so the built-in CA
//! ([`BuiltinIssuer`], keys in 0600 files of the data directory or sealed in
//! a shared store) and an upstream CA (`meshca-vault`: Vault/OpenBao PKI) are
//! interchangeable. An upstream issuer also reports its health
//! ([`Unhealthy`], a reason type), its own lifetime limit, bundle changes
//! made outside meshca, and takes revocations.
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
pub mod rotation;

use async_trait::async_trait;
use meshca_pki::{IssuedLeaf, LeafSpec, PrivateKey, RevokedEntry, Serial};

pub use authority::{Authority, DEFAULT_MAX_TTL, IssueRequest, Issued, KeySource, Policy};
pub use builtin::{
    ADMIN_NAME, ADMIN_NAMESPACE, BuiltinIssuer, DataDir, ImportSpec, InitOptions, InitReport,
    SHARED_CONFIG_BLOB, init_data_dir, init_shared, init_with_issuer, reissue_admin,
};
pub use error::IssuerError;
pub use meshca_pki::VerifiedCsr;
pub use migrate::{CaPlace, CopyReport, copy_ca, verify_copy};
pub use policy::{PolicyRule, check_workload};

/// A signed leaf with the chain that goes with it.
#[derive(Debug)]
pub struct Signed {
    /// The leaf.
    pub leaf: IssuedLeaf,
    /// The intermediates, leaf's issuer first (DER).
    pub chain: Vec<Vec<u8>>,
    /// Which hierarchy signed it.
    pub hierarchy_id: String,
    /// The leaf's key, when it was generated for the caller.
    pub private_key: Option<PrivateKey>,
}

/// Why an issuer cannot sign right now. A reason is a type: `/readyz`,
/// `ca status` and the metrics' labels come from it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unhealthy {
    /// The upstream CA cannot be reached, or did not answer in time.
    Unreachable(String),
    /// The upstream CA (Vault) is sealed.
    Sealed,
    /// The upstream CA refused meshca's credentials.
    Denied(String),
    /// The upstream CA's settings do not allow meshca to work (a missing or
    /// unsafe role).
    Misconfigured(String),
    /// The upstream CA answered with something meshca does not understand.
    BadAnswer(String),
}

impl Unhealthy {
    /// A short label for metrics and status.
    pub fn label(&self) -> &'static str {
        match self {
            Unhealthy::Unreachable(_) => "unreachable",
            Unhealthy::Sealed => "sealed",
            Unhealthy::Denied(_) => "denied",
            Unhealthy::Misconfigured(_) => "misconfigured",
            Unhealthy::BadAnswer(_) => "bad_answer",
        }
    }
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::Unreachable(why) => write!(f, "unreachable: {why}"),
            Unhealthy::Sealed => f.write_str("sealed: unseal it (`bao operator unseal`)"),
            Unhealthy::Denied(why) => write!(f, "refused meshca's credentials: {why}"),
            Unhealthy::Misconfigured(why) => write!(f, "misconfigured: {why}"),
            Unhealthy::BadAnswer(why) => write!(f, "answered with an unexpected body: {why}"),
        }
    }
}

/// Something that signs leaves. See the crate docs.
#[async_trait]
pub trait Issuer: std::fmt::Debug + Send + Sync {
    /// A short name for status output (`builtin`, `vault`).
    fn kind(&self) -> &'static str;

    /// Signs a leaf for the key of a verified CSR, or for a key generated
    /// for the caller (returned in [`Signed::private_key`]), as `spec` says.
    async fn sign(&self, key: &KeySource, spec: &LeafSpec) -> Result<Signed, IssuerError>;

    /// The roots clients should trust (DER), current ones first.
    async fn trust_bundle(&self) -> Result<Vec<Vec<u8>>, IssuerError>;

    /// A CRL (DER) of the issuing CA listing `revoked`, valid for `validity`.
    async fn crl(
        &self,
        revoked: Vec<RevokedEntry>,
        crl_number: u64,
        validity: std::time::Duration,
    ) -> Result<Vec<u8>, IssuerError>;

    /// One CRL per issuing CA in the trust bundle, each signed by that CA
    /// and listing the revoked certificates it signed (`revoked` carries
    /// each certificate's hierarchy id): during a rotation's overlap the
    /// old hierarchy's certificates are still trusted, so their revocation
    /// must be checkable against their own issuer. The issuing CA's CRL
    /// comes first. An upstream CA (Vault) keeps one CRL of its own.
    async fn crls(
        &self,
        revoked: Vec<(String, RevokedEntry)>,
        crl_number: u64,
        validity: std::time::Duration,
    ) -> Result<Vec<Vec<u8>>, IssuerError> {
        let all = revoked.into_iter().map(|(_, e)| e).collect();
        Ok(vec![self.crl(all, crl_number, validity).await?])
    }

    /// The issuing CA certificate (DER) and its notAfter, for status.
    fn issuing_ca(&self) -> (Vec<u8>, time::OffsetDateTime);

    /// The key type of the issuing CA, when meshca holds it (a new
    /// hierarchy gets the same unless told otherwise).
    fn issuing_key_type(&self) -> Option<meshca_pki::KeyType> {
        None
    }

    /// The longest lifetime it signs for `profile`, when it has its own
    /// limit (a Vault role's max_ttl). Requests that ask for no lifetime
    /// get the profile's default cut to this; asking for more is refused.
    fn max_ttl(&self, profile: meshca_pki::Profile) -> Option<std::time::Duration> {
        let _ = profile;
        None
    }

    /// Where the issuer is, for status (`vault https://... mount pki role r`).
    fn describe(&self) -> String {
        self.kind().to_owned()
    }

    /// Whether it can sign now, as far as it knows (no I/O: upstream
    /// issuers track it in the background).
    fn health(&self) -> Result<(), Unhealthy> {
        Ok(())
    }

    /// Tells an upstream CA that a certificate is revoked. meshca's own
    /// record is the authority for meshca; this keeps the upstream CRL in step.
    async fn revoke(&self, serial: &Serial) -> Result<(), IssuerError> {
        let _ = serial;
        Ok(())
    }

    /// Reads the CA state again (a rotation step made here or by another
    /// replica). Upstream issuers refresh by themselves.
    async fn reload(&self) -> Result<(), IssuerError> {
        Ok(())
    }

    /// A counter that moves whenever the trust bundle changed (a rotation
    /// step, a new issuer in Vault).
    fn bundle_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Generates a key of `key_type`. An RSA key takes up to a second and is
/// made on the blocking pool; an EC or Ed25519 key takes tens of
/// microseconds, less than the two thread hand-offs, and is made inline.
pub async fn generate_key(key_type: meshca_pki::KeyType) -> Result<PrivateKey, IssuerError> {
    if !key_type.is_rsa() {
        return PrivateKey::generate(key_type).map_err(IssuerError::from);
    }
    tokio::task::spawn_blocking(move || PrivateKey::generate(key_type))
        .await
        .map_err(|e| IssuerError::Policy(format!("key generation task failed: {e}")))?
        .map_err(IssuerError::from)
}
