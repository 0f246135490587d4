//! Profiles: what a certificate is for, and how long it lives by default.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::PkiError;

const HOUR: u64 = 3600;

/// What a leaf certificate is for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Server and client authentication: a service in a mesh (24h).
    #[default]
    Service,
    /// Server authentication only (24h).
    Server,
    /// Client authentication only: operators, admin, controllers (24h).
    Client,
    /// A long-lived first credential, client authentication only (87600h).
    Bootstrap,
    /// Server authentication for a Kubernetes webhook service (87600h).
    Webhook,
}

impl Profile {
    /// Every profile.
    pub const ALL: [Profile; 5] = [
        Profile::Service,
        Profile::Server,
        Profile::Client,
        Profile::Bootstrap,
        Profile::Webhook,
    ];

    /// The lifetime a certificate of this profile gets when none is asked for.
    pub fn default_ttl(self) -> Duration {
        match self {
            Profile::Service | Profile::Server | Profile::Client => Duration::from_secs(24 * HOUR),
            Profile::Bootstrap | Profile::Webhook => Duration::from_secs(87_600 * HOUR),
        }
    }

    /// Whether the certificate may authenticate a TLS server.
    pub fn server_auth(self) -> bool {
        matches!(self, Profile::Service | Profile::Server | Profile::Webhook)
    }

    /// Whether the certificate may authenticate a TLS client.
    pub fn client_auth(self) -> bool {
        matches!(
            self,
            Profile::Service | Profile::Client | Profile::Bootstrap
        )
    }

    /// The profile's name as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Service => "service",
            Profile::Server => "server",
            Profile::Client => "client",
            Profile::Bootstrap => "bootstrap",
            Profile::Webhook => "webhook",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, PkiError> {
        Profile::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| PkiError::UnknownProfile(s.to_owned()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_usages_are_set() {
        for p in Profile::ALL {
            assert_eq!(p.as_str().parse::<Profile>().unwrap(), p);
            assert!(p.server_auth() || p.client_auth());
        }
        assert!("Service".parse::<Profile>().is_err());
        assert!(
            "admin"
                .parse::<Profile>()
                .unwrap_err()
                .to_string()
                .contains("admin")
        );
        assert_eq!(
            Profile::Bootstrap.default_ttl(),
            Duration::from_secs(87_600 * 3600)
        );
        assert!(!Profile::Client.server_auth() && !Profile::Server.client_auth());
    }
}
