//! The TLS switch's configuration, shared by flags, environment and files.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::TlsError;

/// How a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain TCP/HTTP (the default where nobody asked for TLS).
    #[default]
    Off,
    /// TLS with a server certificate; clients are not authenticated.
    Tls,
    /// Strict mutual TLS: a client certificate from the bundle is required,
    /// and its identity must be on the allow-list when there is one.
    Mtls,
    /// TLS (client certificate verified when offered) and plaintext on the
    /// same port, for migrating a running system.
    Permissive,
}

impl TlsMode {
    /// The mode's name.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::Tls => "tls",
            TlsMode::Mtls => "mtls",
            TlsMode::Permissive => "permissive",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        Ok(match s {
            "off" => TlsMode::Off,
            "tls" => TlsMode::Tls,
            "mtls" => TlsMode::Mtls,
            "permissive" => TlsMode::Permissive,
            _ => {
                return Err(TlsError::Config(format!(
                    "unknown mode {s:?}: use off, tls, mtls or permissive"
                )));
            }
        })
    }
}

/// The oldest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (only where a peer cannot do 1.3).
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only (the default).
    #[default]
    #[serde(rename = "1.3")]
    V1_3,
}

impl FromStr for TlsVersion {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        match s {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            _ => Err(TlsError::Config(format!(
                "unknown TLS version {s:?}: use 1.3 (the default) or 1.2"
            ))),
        }
    }
}

/// A rule for which peers may connect: a SPIFFE ID or a DNS name, exact, or a
/// prefix when it ends with `*` (`spiffe://cluster.local/ns/shop/*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerMatcher {
    pattern: String,
    prefix: bool,
}

impl PeerMatcher {
    /// Parses a rule.
    pub fn new(rule: &str) -> Result<Self, TlsError> {
        let bad = |why: &str| TlsError::Config(format!("invalid allow rule {rule:?}: {why}"));
        if rule.is_empty() {
            return Err(bad("empty"));
        }
        let (pattern, prefix) = match rule.strip_suffix('*') {
            Some(p) => (p, true),
            None => (rule, false),
        };
        if pattern.contains('*') {
            return Err(bad("'*' is allowed only at the end"));
        }
        if prefix && pattern.is_empty() {
            return Err(bad(
                "a lone '*' would allow everyone; leave the allow-list empty instead",
            ));
        }
        if rule.contains("://") && !rule.starts_with("spiffe://") {
            return Err(bad("only spiffe:// URIs and DNS names are matched"));
        }
        Ok(PeerMatcher {
            pattern: pattern.to_owned(),
            prefix,
        })
    }

    fn matches_one(&self, value: &str) -> bool {
        if self.prefix {
            value.starts_with(&self.pattern)
        } else {
            value == self.pattern
        }
    }

    /// Whether a peer with this SPIFFE ID and these DNS names matches.
    pub fn matches(&self, spiffe_id: Option<&str>, dns_names: &[String]) -> bool {
        if self.pattern.starts_with("spiffe://") {
            spiffe_id.is_some_and(|id| self.matches_one(id))
        } else {
            dns_names.iter().any(|d| self.matches_one(d))
        }
    }
}

impl TryFrom<String> for PeerMatcher {
    type Error = TlsError;
    fn try_from(s: String) -> Result<Self, TlsError> {
        PeerMatcher::new(&s)
    }
}

impl From<PeerMatcher> for String {
    fn from(m: PeerMatcher) -> String {
        if m.prefix {
            format!("{}*", m.pattern)
        } else {
            m.pattern
        }
    }
}

impl FromStr for PeerMatcher {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        PeerMatcher::new(s)
    }
}

/// The TLS switch of one listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// off, tls, mtls or permissive.
    #[serde(default)]
    pub mode: TlsMode,
    /// Directory with `tls.crt`, `tls.key`, `ca.crt` (kubernetes.io/tls layout).
    #[serde(default)]
    pub certs: Option<PathBuf>,
    /// Oldest TLS version accepted.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// A plain listener that redirects every request to HTTPS.
    #[serde(default)]
    pub redirect: Option<SocketAddr>,
    /// Peers allowed in `mtls` and `permissive` (empty: any peer the bundle trusts).
    #[serde(default)]
    pub allow: Vec<PeerMatcher>,
    /// ALPN protocols offered: absent, `h2` and `http/1.1` (an HTTP
    /// server); an empty list offers none (a TCP proxy, which must not make
    /// clients speak a protocol its target does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
}

impl TlsConfig {
    /// Checks that the fields fit together.
    pub fn validate(&self) -> Result<(), TlsError> {
        if self.mode != TlsMode::Off && self.certs.is_none() {
            return Err(TlsError::Config(format!(
                "mode {} needs a certificate directory (tls.crt, tls.key, ca.crt)",
                self.mode
            )));
        }
        if self.mode == TlsMode::Off && self.redirect.is_some() {
            return Err(TlsError::Config(
                "a redirect to HTTPS needs a TLS mode (tls, mtls or permissive)".into(),
            ));
        }
        if matches!(self.mode, TlsMode::Off | TlsMode::Tls) && !self.allow.is_empty() {
            return Err(TlsError::Config(format!(
                "an allow-list needs client certificates: mode {} has none (use mtls or permissive)",
                self.mode
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn matchers() {
        let shop = PeerMatcher::new("spiffe://cluster.local/ns/shop/*").unwrap();
        assert!(shop.matches(Some("spiffe://cluster.local/ns/shop/sa/web"), &[]));
        assert!(!shop.matches(Some("spiffe://cluster.local/ns/bank/sa/web"), &[]));
        assert!(!shop.matches(None, &["shop".into()]));
        let exact = PeerMatcher::new("web.shop.svc").unwrap();
        assert!(exact.matches(None, &["a".into(), "web.shop.svc".into()]));
        assert!(!exact.matches(None, &["web.shop.svc.cluster.local".into()]));
        for bad in ["", "*", "a*b", "https://x"] {
            assert!(PeerMatcher::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_rules() {
        let mut c = TlsConfig {
            mode: TlsMode::Mtls,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("certificate directory")
        );
        c.certs = Some("/x".into());
        c.validate().unwrap();
        c.mode = TlsMode::Tls;
        c.allow = vec![PeerMatcher::new("web").unwrap()];
        assert!(c.validate().is_err());
        let parsed: TlsConfig = serde_json::from_str(
            r#"{"mode":"permissive","certs":"/c","min_version":"1.2","allow":["spiffe://td/ns/a/*"]}"#,
        )
        .unwrap();
        assert_eq!(parsed.min_version, TlsVersion::V1_2);
        assert!(serde_json::from_str::<TlsConfig>(r#"{"mode":"strict"}"#).is_err());
    }
}
