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
    /// The private key file can be read by group or others: whoever else
    /// could read it may hold the key, so it is not used.
    InsecureKey {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
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
    /// A TLS handshake failed; the reason is typed (metrics labels).
    Handshake {
        /// Why.
        reason: HandshakeFailure,
        /// What the TLS library said.
        detail: String,
    },
}

/// Why a TLS handshake failed. A reason is a type: logs and metrics take
/// their labels from it, never from message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The peer did not finish the handshake in time.
    Timeout,
    /// The client sent no certificate where one is required.
    NoClientCertificate,
    /// The client's certificate is good but its identity is not allowed.
    NotAllowed,
    /// The certificate does not chain to the trust bundle.
    Untrusted,
    /// The certificate is expired or not yet valid.
    Expired,
    /// The certificate is unusable otherwise (wrong usage, bad encoding,
    /// wrong name).
    BadCertificate,
    /// No common protocol version or cipher suite (an old client).
    Incompatible,
    /// The bytes were not TLS.
    NotTls,
    /// The peer refused us with an alert (it did not trust our certificate).
    PeerRefused,
    /// The connection broke.
    Io,
}

impl HandshakeFailure {
    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NoClientCertificate => "no_client_certificate",
            HandshakeFailure::NotAllowed => "not_allowed",
            HandshakeFailure::Untrusted => "untrusted",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::PeerRefused => "peer_refused",
            HandshakeFailure::Io => "io",
        }
    }

    /// Classifies an error from a tokio-rustls handshake by the rustls error
    /// it carries.
    pub fn of(e: &std::io::Error) -> Self {
        use rustls::{CertificateError, Error};
        let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
            return HandshakeFailure::Io;
        };
        match tls {
            Error::NoCertificatesPresented => HandshakeFailure::NoClientCertificate,
            Error::InvalidCertificate(c) => match c {
                CertificateError::ApplicationVerificationFailure => HandshakeFailure::NotAllowed,
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    HandshakeFailure::Untrusted
                }
                CertificateError::Expired
                | CertificateError::NotValidYet
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYetContext { .. } => HandshakeFailure::Expired,
                _ => HandshakeFailure::BadCertificate,
            },
            Error::PeerIncompatible(_) => HandshakeFailure::Incompatible,
            Error::InvalidMessage(_)
            | Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. } => HandshakeFailure::NotTls,
            Error::AlertReceived(_) => HandshakeFailure::PeerRefused,
            _ => HandshakeFailure::Io,
        }
    }
}

impl TlsError {
    /// True when the problem is in the credential files (as opposed to
    /// configuration or the network).
    pub fn is_credentials(&self) -> bool {
        matches!(
            self,
            TlsError::Unreadable { .. }
                | TlsError::InsecureKey { .. }
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
            TlsError::InsecureKey { path, mode } => write!(
                f,
                "{} holds a private key that group or others can read (mode {:04o}): \
                 run `chmod 600 {}` (and treat the key as exposed if someone else could read it)",
                path.display(),
                mode & 0o7777,
                path.display()
            ),
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
            TlsError::Handshake { reason, detail } => {
                write!(f, "TLS handshake failed ({}): {detail}", reason.label())
            }
        }
    }
}

impl std::error::Error for TlsError {}
