//! The one error type of `meshca-pki`.

use std::fmt;

/// Everything that can go wrong while building or checking X.509 material.
///
/// Each message says what was wrong and, where there is one, what to do about
/// it. Callers decide on the kind with the predicates ([`PkiError::is_bad_input`])
/// rather than by matching message text. No dependency's error type leaks out:
/// the text of an underlying error is kept as a string.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PkiError {
    /// A duration did not parse (Go syntax: `24h`, `90m`, `1.5h`, `1h30m`).
    InvalidDuration {
        /// The text as given.
        input: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// A name, namespace or trust domain that is not allowed.
    InvalidName {
        /// Which field (`name`, `namespace`, `trust domain`).
        field: &'static str,
        /// The value as given.
        value: String,
        /// The rule it broke.
        reason: String,
    },
    /// An extra DNS SAN that is not a valid DNS name or is outside policy.
    InvalidDnsName {
        /// The value as given.
        value: String,
        /// The rule it broke.
        reason: String,
    },
    /// An extra IP SAN that does not parse.
    InvalidIp {
        /// The value as given.
        value: String,
    },
    /// An unknown key type.
    UnknownKeyType(String),
    /// An unknown profile.
    UnknownProfile(String),
    /// A lifetime that is zero or above the configured maximum.
    InvalidTtl {
        /// The lifetime asked for, as written.
        ttl: String,
        /// The rule it broke.
        reason: String,
    },
    /// A CSR that does not parse.
    MalformedCsr(String),
    /// A CSR whose self-signature does not verify.
    BadCsrSignature,
    /// A public key (of a CSR or a certificate) that policy refuses.
    RejectedKey(String),
    /// A private key that does not parse.
    MalformedKey(String),
    /// A private key that does not belong to the certificate it was given with.
    KeyMismatch {
        /// What the certificate is (for example `root certificate`).
        what: String,
    },
    /// A certificate that does not parse.
    MalformedCertificate(String),
    /// A certificate that was expected to be a CA and is not one.
    NotACa {
        /// What the certificate is.
        what: String,
        /// The rule it broke.
        reason: String,
    },
    /// A certificate chain that does not verify.
    ChainInvalid(String),
    /// The issuing CA has expired or is not yet valid.
    IssuerExpired {
        /// The issuer's notAfter, RFC 3339.
        not_after: String,
    },
    /// The signing library failed; this is a bug or an unsupported combination.
    Signing(String),
    /// The system random number generator failed.
    Random,
    /// A seal key that is not 32 bytes (64 hex digits).
    BadSealKey(String),
    /// Sealed data that the seal key does not open: another key sealed it,
    /// or it was altered.
    Unseal(String),
}

impl PkiError {
    /// True when the error is the caller's input (a 4xx, not a 5xx).
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            PkiError::Signing(_)
                | PkiError::Random
                | PkiError::IssuerExpired { .. }
                | PkiError::Unseal(_)
        )
    }
}

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PkiError::InvalidDuration { input, reason } => write!(
                f,
                "invalid duration {input:?}: {reason} (write it the Go way, for example 24h, 90m, 1.5h or 1h30m)"
            ),
            PkiError::InvalidName {
                field,
                value,
                reason,
            } => write!(f, "invalid {field} {value:?}: {reason}"),
            PkiError::InvalidDnsName { value, reason } => {
                write!(f, "invalid DNS name {value:?}: {reason}")
            }
            PkiError::InvalidIp { value } => write!(
                f,
                "invalid IP address {value:?}: expected an IPv4 or IPv6 address such as 10.0.0.1 or ::1"
            ),
            PkiError::UnknownKeyType(t) => write!(
                f,
                "unknown key type {t:?}: use one of ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096"
            ),
            PkiError::UnknownProfile(p) => write!(
                f,
                "unknown profile {p:?}: use one of service, server, client, bootstrap, webhook"
            ),
            PkiError::InvalidTtl { ttl, reason } => write!(f, "invalid ttl {ttl:?}: {reason}"),
            PkiError::MalformedCsr(why) => write!(
                f,
                "the CSR could not be parsed: {why} (expected a PKCS#10 request, PEM or DER)"
            ),
            PkiError::BadCsrSignature => write!(
                f,
                "the CSR's signature does not verify: it was altered or not signed by the key it carries; create a new CSR"
            ),
            PkiError::RejectedKey(why) => write!(f, "public key refused: {why}"),
            PkiError::MalformedKey(why) => write!(
                f,
                "the private key could not be parsed: {why} (expected PEM PKCS#8, SEC1 or PKCS#1)"
            ),
            PkiError::KeyMismatch { what } => write!(
                f,
                "the private key does not match the {what}: give the key that belongs to it"
            ),
            PkiError::MalformedCertificate(why) => {
                write!(f, "the certificate could not be parsed: {why}")
            }
            PkiError::NotACa { what, reason } => {
                write!(f, "the {what} cannot be used as a CA: {reason}")
            }
            PkiError::ChainInvalid(why) => write!(f, "the chain does not verify: {why}"),
            PkiError::IssuerExpired { not_after } => write!(
                f,
                "the issuing CA is not valid now (notAfter {not_after}): rotate the CA before issuing"
            ),
            PkiError::Signing(why) => write!(f, "signing failed: {why}"),
            PkiError::Random => write!(f, "the system random number generator failed"),
            PkiError::BadSealKey(why) => write!(
                f,
                "the seal key is unusable ({why}): it must be 32 random bytes written as 64 hex digits, e.g. from `openssl rand -hex 32`"
            ),
            PkiError::Unseal(what) => write!(
                f,
                "the seal key does not open {what}: it is not the key the CA was sealed with (give every replica the same --seal-key-file), or the stored data was altered"
            ),
        }
    }
}

impl std::error::Error for PkiError {}

/// Keeps rcgen's error type out of our API: its text is all we carry.
pub(crate) fn signing(e: rcgen::Error) -> PkiError {
    PkiError::Signing(e.to_string())
}
