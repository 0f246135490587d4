//! The one error type of `meshca-vault`.

use std::fmt;

use meshca_issuer::{IssuerError, Unhealthy};

/// What can go wrong talking to Vault.
#[derive(Debug)]
#[non_exhaustive]
pub enum VaultError {
    /// A setting is wrong (which field, which rule).
    Config {
        /// The field (`addr`, `role`, ...), as in `[issuer.vault]`.
        field: &'static str,
        /// What is wrong and what to do.
        rule: String,
    },
    /// A local file (token, secret id, CA) could not be used.
    File(meshca_files::FileError),
    /// Vault could not be reached or did not answer in time.
    Unreachable {
        /// Vault's address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Vault is sealed.
    Sealed {
        /// Vault's address.
        addr: String,
    },
    /// Vault refused meshca's token (missing, expired, revoked, or without
    /// the policy for this path).
    Denied {
        /// The path called.
        path: String,
        /// Vault's reason.
        reason: String,
    },
    /// The path does not exist (a missing role or mount).
    NotFound {
        /// The path called.
        path: String,
    },
    /// Vault refused the request itself (HTTP 400): its reason is quoted.
    Refused {
        /// The path called.
        path: String,
        /// Vault's reason.
        reason: String,
    },
    /// The role's settings would let Vault decide names, or do not fit.
    Role {
        /// The role.
        role: String,
        /// What is wrong and how to fix it.
        rule: String,
    },
    /// Vault answered with a redirect, which meshca does not follow: it
    /// would carry the token (or an AppRole login's secret id) elsewhere.
    Redirected {
        /// Vault's address, as configured.
        addr: String,
        /// The path called.
        path: String,
        /// The HTTP status (301, 302, 307, ...).
        status: u16,
        /// Where it pointed (its `Location`).
        location: String,
    },
    /// A certificate Vault signed failed one of meshca's checks; it was not
    /// handed out (and is revoked in Vault when `revoked`).
    Unsafe {
        /// The role that signed it.
        role: String,
        /// The PKI mount.
        mount: String,
        /// Its serial, as Vault writes it (colon-separated hex).
        serial: String,
        /// The check it failed: `key`, `names`, `basic_constraints`,
        /// `key_usage`, `ext_key_usage`, `not_after`, `chain`.
        check: &'static str,
        /// What the certificate has, and what to change (naming the role
        /// setting).
        reason: String,
        /// Whether Vault took its revocation.
        revoked: bool,
    },
    /// Vault answered with something meshca does not understand.
    BadAnswer {
        /// The path called.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl VaultError {
    /// Whether this is about Vault's availability (retry later), not the request.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            VaultError::Unreachable { .. } | VaultError::Sealed { .. }
        )
    }

    /// Whether Vault refused meshca's credentials.
    pub fn is_denied(&self) -> bool {
        matches!(self, VaultError::Denied { .. })
    }

    /// What this says about Vault's health, when it says anything (a
    /// refused request does not make Vault unhealthy).
    pub fn unhealthy(&self) -> Option<Unhealthy> {
        match self {
            VaultError::Unreachable { reason, .. } => Some(Unhealthy::Unreachable(reason.clone())),
            VaultError::Sealed { .. } => Some(Unhealthy::Sealed),
            VaultError::Denied { .. } => Some(Unhealthy::Denied(self.to_string())),
            VaultError::NotFound { .. }
            | VaultError::Role { .. }
            | VaultError::Config { .. }
            | VaultError::Redirected { .. }
            | VaultError::Unsafe { .. }
            | VaultError::File(_) => Some(Unhealthy::Misconfigured(self.to_string())),
            VaultError::BadAnswer { .. } => Some(Unhealthy::BadAnswer(self.to_string())),
            VaultError::Refused { .. } => None,
        }
    }

    /// The error a caller of the issuer sees.
    pub fn into_issuer_error(self, issuer: &str) -> IssuerError {
        match self.unhealthy() {
            Some(problem) => IssuerError::Upstream {
                issuer: issuer.to_owned(),
                problem,
            },
            None => IssuerError::UpstreamRefused {
                issuer: issuer.to_owned(),
                reason: self.to_string(),
            },
        }
    }
}

impl fmt::Display for VaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VaultError::Config { field, rule } => write!(f, "vault setting {field}: {rule}"),
            VaultError::File(e) => e.fmt(f),
            VaultError::Unreachable { addr, reason } => write!(
                f,
                "Vault at {addr} did not answer: {reason}; check that it runs and that the address (--vault-addr) is right"
            ),
            VaultError::Sealed { addr } => {
                write!(
                    f,
                    "Vault at {addr} is sealed; unseal it (`bao operator unseal`)"
                )
            }
            VaultError::Denied { path, reason } => write!(
                f,
                "Vault refused meshca's token on {path} ({reason}); check the token (--vault-token-file) or AppRole and its policy"
            ),
            VaultError::NotFound { path } => write!(
                f,
                "Vault has nothing at {path}; check the mount (--vault-mount) and the role (--vault-role)"
            ),
            VaultError::Refused { path, reason } => write!(f, "Vault refused {path}: {reason}"),
            VaultError::Role { role, rule } => {
                write!(f, "the Vault role {role:?} cannot be used: {rule}")
            }
            VaultError::Redirected {
                addr,
                path,
                status,
                location,
            } => write!(
                f,
                "Vault at {addr} answered {path} with HTTP {status}, a redirect to {location}; meshca does not follow redirects from Vault (they would carry its token or AppRole secret id to wherever they point): set --vault-addr (addr in [issuer.vault]) to an address that answers itself, such as the active node or a load balancer in front of the cluster"
            ),
            VaultError::Unsafe {
                role,
                mount,
                serial,
                check,
                reason,
                revoked,
            } => {
                write!(
                    f,
                    "the Vault role {role:?} signed certificate {serial}, which failed meshca's {check} check: {reason}. "
                )?;
                if *revoked {
                    f.write_str("meshca did not hand it out and revoked it in Vault")
                } else {
                    write!(
                        f,
                        "meshca did not hand it out, but revoking it in Vault failed: revoke it there (bao write {mount}/revoke serial_number={serial})"
                    )
                }
            }
            VaultError::BadAnswer { path, reason } => {
                write!(f, "Vault answered {path} with an unexpected body: {reason}")
            }
        }
    }
}

impl std::error::Error for VaultError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VaultError::File(e) => Some(e),
            _ => None,
        }
    }
}

impl From<meshca_files::FileError> for VaultError {
    fn from(e: meshca_files::FileError) -> Self {
        VaultError::File(e)
    }
}
