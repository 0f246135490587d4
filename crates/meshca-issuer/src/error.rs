//! The one error type of `meshca-issuer`.

use std::fmt;
use std::path::PathBuf;

use meshca_files::FileError;
use meshca_pki::PkiError;
use meshca_store::StoreError;

/// What can go wrong while setting up a CA or issuing.
#[derive(Debug)]
#[non_exhaustive]
pub enum IssuerError {
    /// Bad input or a certificate problem (see [`PkiError`]).
    Pki(PkiError),
    /// The store failed.
    Store(StoreError),
    /// A file could not be read or written.
    File(FileError),
    /// The data directory does not exist or holds no CA.
    NoCa {
        /// The data directory.
        dir: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// `init` on a directory that already holds a CA.
    AlreadyInitialised {
        /// The data directory.
        dir: PathBuf,
    },
    /// An imported certificate or key failed a check.
    Import {
        /// The file given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A caller asked for something the policy does not allow.
    Policy(String),
    /// `init` on a shared store that already holds a CA.
    StoreHoldsCa {
        /// Where the store is.
        location: String,
    },
    /// The CA keys are sealed in the store and no seal key was given.
    NeedSealKey {
        /// Where the store is.
        location: String,
    },
    /// A root rotation step cannot be taken now (which stage, what to do).
    Rotation(String),
    /// The upstream CA (Vault) cannot sign now.
    Upstream {
        /// Which upstream, as `describe` says it.
        issuer: String,
        /// Why.
        problem: crate::Unhealthy,
    },
    /// The upstream CA refused this request; its reason is quoted.
    UpstreamRefused {
        /// Which upstream.
        issuer: String,
        /// The upstream's reason.
        reason: String,
    },
}

impl IssuerError {
    /// True when the caller's input is at fault (a 4xx, not a 5xx).
    pub fn is_bad_input(&self) -> bool {
        match self {
            IssuerError::Pki(e) => e.is_bad_input(),
            IssuerError::Policy(_)
            | IssuerError::Import { .. }
            | IssuerError::UpstreamRefused { .. } => true,
            _ => false,
        }
    }

    /// Why the upstream CA cannot sign, when that is the error (a 503).
    pub fn upstream_problem(&self) -> Option<&crate::Unhealthy> {
        match self {
            IssuerError::Upstream { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

impl fmt::Display for IssuerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IssuerError::Pki(e) => e.fmt(f),
            IssuerError::Store(e) => e.fmt(f),
            IssuerError::File(e) => e.fmt(f),
            IssuerError::NoCa { dir, reason } => write!(
                f,
                "no CA in {}: {reason}; run `meshca init --dir {}` first (or give the right --dir / MESHCA_DIR)",
                dir.display(),
                dir.display()
            ),
            IssuerError::AlreadyInitialised { dir } => write!(
                f,
                "{} already holds a CA; nothing was changed (use another --dir, or `meshca ca rotate` to replace the root)",
                dir.display()
            ),
            IssuerError::Import { path, reason } => {
                write!(f, "cannot import {}: {reason}", path.display())
            }
            IssuerError::Policy(why) => write!(f, "refused by policy: {why}"),
            IssuerError::StoreHoldsCa { location } => write!(
                f,
                "the store {location} already holds a CA; nothing was changed (start `meshca serve` against it to join it as another replica)"
            ),
            IssuerError::NeedSealKey { location } => write!(
                f,
                "the CA keys in {location} are sealed: give the seal key with --seal-key-file (or MESHCA_SEAL_KEY_FILE)"
            ),
            IssuerError::Rotation(why) => write!(f, "root rotation: {why}"),
            IssuerError::Upstream { issuer, problem } => {
                write!(f, "the upstream CA ({issuer}) cannot sign now: {problem}")
            }
            IssuerError::UpstreamRefused { issuer, reason } => {
                write!(
                    f,
                    "the upstream CA ({issuer}) refused the request: {reason}"
                )
            }
        }
    }
}

impl std::error::Error for IssuerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IssuerError::Pki(e) => Some(e),
            IssuerError::Store(e) => Some(e),
            IssuerError::File(e) => Some(e),
            _ => None,
        }
    }
}

impl From<PkiError> for IssuerError {
    fn from(e: PkiError) -> Self {
        IssuerError::Pki(e)
    }
}

impl From<StoreError> for IssuerError {
    fn from(e: StoreError) -> Self {
        IssuerError::Store(e)
    }
}

impl From<FileError> for IssuerError {
    fn from(e: FileError) -> Self {
        IssuerError::File(e)
    }
}
