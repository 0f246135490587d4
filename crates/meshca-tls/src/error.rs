//! The one error type of `meshca-tls`.

use std::fmt;
use std::path::PathBuf;

/// What can go wrong when loading credentials or serving TLS.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TlsError {
    /// A credential file is missing or unreadable.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// A credential file does not parse.
    Unparsable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key in `tls.key` is not the key of the certificate in `tls.crt`.
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The certificate is outside its validity period.
    Expired {
        /// The file.
        path: PathBuf,
        /// Its notBefore/notAfter and how far off now is.
        reason: String,
    },
    /// The certificate does not chain to the trust bundle.
    Untrusted {
        /// The certificate file.
        cert: PathBuf,
        /// The bundle file.
        bundle: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The configuration is invalid.
    Config(String),
    /// rustls refused the configuration.
    Rustls(String),
    /// Listening or accepting failed.
    Io(String),
}

impl TlsError {
    /// True when the problem is in the credential files (as opposed to
    /// configuration or the network).
    pub fn is_credentials(&self) -> bool {
        matches!(
            self,
            TlsError::Unreadable { .. }
                | TlsError::Unparsable { .. }
                | TlsError::KeyMismatch { .. }
                | TlsError::Expired { .. }
                | TlsError::Untrusted { .. }
        )
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Unreadable { path, reason } => {
                write!(f, "cannot read {}: {reason}", path.display())
            }
            TlsError::Unparsable { path, reason } => {
                write!(f, "{} does not parse: {reason}", path.display())
            }
            TlsError::KeyMismatch { key, cert } => write!(
                f,
                "{} is not the private key of the certificate in {}: replace both together",
                key.display(),
                cert.display()
            ),
            TlsError::Expired { path, reason } => write!(
                f,
                "the certificate in {} is not valid now: {reason}; renew it",
                path.display()
            ),
            TlsError::Untrusted {
                cert,
                bundle,
                reason,
            } => write!(
                f,
                "the certificate in {} does not chain to a CA in {}: {reason}",
                cert.display(),
                bundle.display()
            ),
            TlsError::Config(why) => write!(f, "invalid TLS configuration: {why}"),
            TlsError::Rustls(why) => write!(f, "TLS setup failed: {why}"),
            TlsError::Io(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for TlsError {}
