//! The one error type of `meshca-proxy`.

use std::fmt;

/// What stops a proxy from starting.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProxyError {
    /// A route's settings are wrong (which route, which field, which rule).
    Config {
        /// The route's name (or `proxy` for the global settings).
        route: String,
        /// What is wrong and what to do.
        rule: String,
    },
    /// A route's certificates could not be used.
    Tls {
        /// The route.
        route: String,
        /// Why.
        source: meshca_tls::TlsError,
    },
    /// A listener could not be opened.
    Listen {
        /// The route (or `health`).
        route: String,
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Config { route, rule } => write!(f, "route {route}: {rule}"),
            ProxyError::Tls { route, source } => write!(f, "route {route}: {source}"),
            ProxyError::Listen {
                route,
                addr,
                reason,
            } => write!(f, "route {route}: cannot listen on {addr}: {reason}"),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyError::Tls { source, .. } => Some(source),
            _ => None,
        }
    }
}
