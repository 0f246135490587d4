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
    /// same port, for migrating a running system. Takes no allow-list: it
    /// could not keep out the clients that do not identify themselves.
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

/// What an allow rule (or a client's expected server) may be, for error
/// messages: every refusal ends with it.
const ALLOWED_FORMS: &str = "a rule is an exact SPIFFE ID (spiffe://cluster.local/ns/shop/sa/web), \
a SPIFFE ID path followed by /* for every ID below it (spiffe://cluster.local/ns/shop/*), \
or an exact DNS name (web.shop.svc)";

/// Longest SPIFFE ID accepted (the SPIFFE ID specification's limit).
const MAX_SPIFFE_ID: usize = 2048;

/// A rule for which peers may connect. Three forms only, so that a rule
/// admits exactly what it reads as:
/// - an exact SPIFFE ID, `spiffe://cluster.local/ns/shop/sa/web`;
/// - a SPIFFE ID path followed by `/*`, `spiffe://cluster.local/ns/shop/*`:
///   every ID whose path continues below `/ns/shop/`, on a segment boundary
///   (not `ns/shopping`);
/// - an exact DNS name, `web.shop.svc` (no wildcard, no prefix).
///
/// A trailing `*` used to be a raw string prefix, so `.../ns/shop*` also
/// admitted `ns/shopping` and `api*` admitted `api.other.svc`; such rules
/// are now refused when the configuration is loaded, with the forms above.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerMatcher {
    rule: Rule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// Exactly this SPIFFE ID.
    SpiffeExact(String),
    /// Every valid SPIFFE ID that starts with this, which ends with `/`.
    SpiffeBelow(String),
    /// Exactly this DNS name (kept in lower case).
    Dns(String),
}

/// Checks a SPIFFE trust domain: what meshca issues under, a lower-case DNS
/// name (so no port, user info or upper case that would make one trust
/// domain look like two).
fn check_trust_domain(td: &str) -> Result<(), String> {
    meshca_pki::TrustDomain::new(td)
        .map(|_| ())
        .map_err(|e| match e {
            meshca_pki::PkiError::InvalidName { reason, .. } => {
                format!("trust domain {td:?}: {reason}")
            }
            other => format!("trust domain {td:?}: {other}"),
        })
}

/// Checks the path of a SPIFFE ID (after the trust domain and its `/`):
/// non-empty segments of letters, digits, `.`, `-` and `_` (the SPIFFE ID
/// specification's set), none of them `.` or `..`. That leaves no room for
/// a query, a fragment or percent-encoding, which would let two spellings
/// name one workload.
fn check_spiffe_path(path: &str) -> Result<(), String> {
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err("empty path segment (a doubled or trailing '/')".into());
        }
        if segment == "." || segment == ".." {
            return Err(format!("path segment {segment:?} is not allowed"));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            let what = match c {
                '?' => "a SPIFFE ID has no query",
                '#' => "a SPIFFE ID has no fragment",
                '%' => "a SPIFFE ID has no percent-encoding",
                _ => "a path holds only letters, digits, '.', '-' and '_'",
            };
            return Err(format!("character {c:?} in the path: {what}"));
        }
    }
    Ok(())
}

impl PeerMatcher {
    /// Parses an allow rule; a refusal names the rule and the forms allowed.
    pub fn new(rule: &str) -> Result<Self, TlsError> {
        Self::parse(rule, "allow rule")
    }

    /// Parses a rule; `what` names it in errors (`allow rule`, `server identity`).
    pub(crate) fn parse(rule: &str, what: &str) -> Result<Self, TlsError> {
        let bad = |why: &str| {
            TlsError::Config(format!("invalid {what} {rule:?}: {why}; {ALLOWED_FORMS}"))
        };
        if rule.is_empty() {
            return Err(bad("it is empty"));
        }
        if rule == "*" {
            return Err(bad(
                "a lone '*' would allow everyone; leave the allow-list empty instead",
            ));
        }
        if let Some(rest) = rule.strip_prefix("spiffe://") {
            if rule.len() > MAX_SPIFFE_ID {
                return Err(bad(&format!(
                    "longer than the {MAX_SPIFFE_ID} bytes a SPIFFE ID may have"
                )));
            }
            let (body, below) = match rest.strip_suffix("/*") {
                Some(body) => (body, true),
                None => (rest, false),
            };
            if body.contains('*') {
                return Err(bad(
                    "'*' may only end a SPIFFE ID as a whole path segment, /* \
                     (a prefix such as ns/shop* would also admit ns/shopping)",
                ));
            }
            let (td, path) = match body.split_once('/') {
                Some((td, path)) => (td, Some(path)),
                None => (body, None),
            };
            check_trust_domain(td).map_err(|why| bad(&why))?;
            match path {
                Some(path) => check_spiffe_path(path).map_err(|why| bad(&why))?,
                // spiffe://td/* is the whole trust domain; an exact
                // spiffe://td names no workload (an X.509 SVID has a path).
                None if !below => {
                    return Err(bad(
                        "a workload's SPIFFE ID has a path after the trust domain; \
                         spiffe://<trust domain>/* allows the whole trust domain",
                    ));
                }
                None => {}
            }
            let rule = if below {
                Rule::SpiffeBelow(format!("spiffe://{body}/"))
            } else {
                Rule::SpiffeExact(rule.to_owned())
            };
            return Ok(PeerMatcher { rule });
        }
        if rule
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:"))
        {
            return Err(bad("a SPIFFE ID starts with spiffe:// (lower case)"));
        }
        if rule.contains("://") {
            return Err(bad("only spiffe:// URIs and DNS names are matched"));
        }
        if rule.contains('*') {
            return Err(bad(
                "DNS names are matched exactly, with no wildcard or prefix: name each peer",
            ));
        }
        if rule.parse::<std::net::IpAddr>().is_ok() {
            return Err(bad(
                "IP addresses are not matched: a client is known by the SPIFFE ID or DNS name in its certificate",
            ));
        }
        let name = meshca_pki::validate_dns_name(rule).map_err(|e| match e {
            meshca_pki::PkiError::InvalidDnsName { reason, .. } => bad(&reason),
            other => bad(&other.to_string()),
        })?;
        Ok(PeerMatcher {
            rule: Rule::Dns(name),
        })
    }

    /// Whether a peer with this SPIFFE ID and these DNS names matches.
    pub fn matches(&self, spiffe_id: Option<&str>, dns_names: &[String]) -> bool {
        match &self.rule {
            Rule::SpiffeExact(id) => spiffe_id == Some(id.as_str()),
            // The rest of the peer's ID is checked like a rule's path, so
            // `.../ns/shop/../bank/sa/x` or `.../ns/shop//x` from some other
            // CA in the bundle is not taken for an ID below ns/shop.
            Rule::SpiffeBelow(prefix) => spiffe_id
                .and_then(|id| id.strip_prefix(prefix.as_str()))
                .is_some_and(|rest| {
                    prefix.len() + rest.len() <= MAX_SPIFFE_ID && check_spiffe_path(rest).is_ok()
                }),
            // DNS names compare without regard to case (RFC 4343); the rule
            // is kept in lower case.
            Rule::Dns(name) => dns_names.iter().any(|d| d.eq_ignore_ascii_case(name)),
        }
    }
}

impl fmt::Display for PeerMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Rule::SpiffeExact(id) => f.write_str(id),
            Rule::SpiffeBelow(prefix) => write!(f, "{prefix}*"),
            Rule::Dns(name) => f.write_str(name),
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
        m.to_string()
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
    /// Peers allowed in `mtls` (empty: any peer the bundle trusts). Not in
    /// `permissive`, where a client without a certificate gets in anyway.
    #[serde(default)]
    pub allow: Vec<PeerMatcher>,
    /// ALPN protocols offered: absent, `h2` and `http/1.1` (an HTTP
    /// server); an empty list offers none (a TCP proxy, which must not make
    /// clients speak a protocol its target does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// What a client certificate whose revocation cannot be checked gets
    /// (no current CRL of its issuer in `ca.crl`).
    #[serde(default)]
    pub revocation: Revocation,
}

/// What happens when a client certificate's revocation cannot be checked:
/// `ca.crl` lacks its issuer's CRL, or that CRL's nextUpdate has passed
/// (the agent could not refresh it). A certificate listed in a CRL that is
/// there is refused either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Revocation {
    /// Let it in (the default: a CA away for longer than a CRL lives must
    /// not stop traffic).
    #[default]
    FailOpen,
    /// Refuse it: only peers checked against a current CRL get in.
    FailClosed,
}

impl FromStr for Revocation {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        match s {
            "fail-open" => Ok(Revocation::FailOpen),
            "fail-closed" => Ok(Revocation::FailClosed),
            other => Err(TlsError::Config(format!(
                "revocation {other:?}: use fail-open or fail-closed"
            ))),
        }
    }
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
                "an allow-list needs client certificates: mode {} has none (use mtls)",
                self.mode
            )));
        }
        // Permissive lets in a client without a certificate, and plaintext,
        // while it would refuse a certificate outside the list: the list
        // would keep out only those who identify themselves. Refused rather
        // than half-enforced.
        if self.mode == TlsMode::Permissive && !self.allow.is_empty() {
            return Err(TlsError::Config(
                "an allow-list cannot be enforced in permissive mode: clients without a certificate, \
                 and plaintext clients, get through, and only certificates outside the list would be refused; \
                 use mode mtls to enforce the list, or drop the list while migrating"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(rule: &str) -> PeerMatcher {
        PeerMatcher::new(rule).unwrap()
    }

    #[test]
    fn spiffe_rules_match_on_segment_boundaries() {
        let shop = m("spiffe://cluster.local/ns/shop/*");
        assert!(shop.matches(Some("spiffe://cluster.local/ns/shop/sa/web"), &[]));
        assert!(shop.matches(Some("spiffe://cluster.local/ns/shop/x"), &[]));
        for outside in [
            // The old raw prefix admitted these.
            "spiffe://cluster.local/ns/shopping/sa/web",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/",
            "spiffe://cluster.local/ns/bank/sa/web",
            "spiffe://other.td/ns/shop/sa/web",
            // Spellings of other IDs, from some other CA in the bundle.
            "spiffe://cluster.local/ns/shop/../bank/sa/web",
            "spiffe://cluster.local/ns/shop/./sa/web",
            "spiffe://cluster.local/ns/shop//sa/web",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe://cluster.local/ns/shop/sa/web#f",
            "spiffe://cluster.local/ns/shop/sa/w%65b",
        ] {
            assert!(!shop.matches(Some(outside), &[]), "{outside}");
        }
        // A SPIFFE rule never matches a DNS name, nor a peer without an ID.
        assert!(!shop.matches(None, &["spiffe://cluster.local/ns/shop/sa/web".into()]));
        let td = m("spiffe://cluster.local/*");
        assert!(td.matches(Some("spiffe://cluster.local/ns/a/sa/b"), &[]));
        assert!(!td.matches(Some("spiffe://cluster.local.evil/ns/a/sa/b"), &[]));
        let exact = m("spiffe://cluster.local/ns/shop/sa/web");
        assert!(exact.matches(Some("spiffe://cluster.local/ns/shop/sa/web"), &[]));
        assert!(!exact.matches(Some("spiffe://cluster.local/ns/shop/sa/web/x"), &[]));
        assert!(!exact.matches(Some("spiffe://cluster.local/ns/shop/sa/webx"), &[]));
    }

    #[test]
    fn dns_rules_are_exact() {
        let exact = m("web.shop.svc");
        assert!(exact.matches(None, &["a".into(), "web.shop.svc".into()]));
        assert!(exact.matches(None, &["WEB.shop.svc".into()]));
        assert!(!exact.matches(None, &["web.shop.svc.cluster.local".into()]));
        assert!(!exact.matches(None, &["*.shop.svc".into()]));
        assert!(!exact.matches(Some("spiffe://cluster.local/ns/shop/sa/web"), &[]));
        // Kept in lower case.
        assert_eq!(m("Web.Shop.svc").to_string(), "web.shop.svc");
    }

    #[test]
    fn other_rules_are_refused_naming_the_rule_and_the_forms() {
        for (bad, why) in [
            ("", "empty"),
            ("*", "lone '*'"),
            ("spiffe://cluster.local/ns/shop*", "whole path segment, /*"),
            (
                "spiffe://cluster.local/ns/*/sa/web",
                "whole path segment, /*",
            ),
            (
                "spiffe://cluster.local/ns/shop/**",
                "whole path segment, /*",
            ),
            ("spiffe://cluster.local*", "whole path segment, /*"),
            ("api*", "matched exactly"),
            ("*.shop.svc", "matched exactly"),
            ("web.*.svc", "matched exactly"),
            ("spiffe://Cluster.local/ns/a/sa/b", "lower case"),
            ("spiffe:///ns/a/sa/b", "trust domain \"\""),
            ("spiffe://td:8443/ns/a/sa/b", "trust domain"),
            ("spiffe://user@td/ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local", "has a path"),
            ("spiffe://cluster.local/", "empty path segment"),
            ("spiffe://cluster.local/ns/a/", "empty path segment"),
            ("spiffe://cluster.local/ns//a", "empty path segment"),
            ("spiffe://cluster.local/ns/../a", "\"..\""),
            ("spiffe://cluster.local/ns/./a", "\".\""),
            ("spiffe://cluster.local/ns/a?x=1", "no query"),
            ("spiffe://cluster.local/ns/a#top", "no fragment"),
            ("spiffe://cluster.local/ns/%61", "no percent-encoding"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe:/cluster.local/ns/a", "spiffe://"),
            ("https://web.shop.svc", "only spiffe://"),
            ("10.0.0.1", "IP addresses"),
            ("web..svc", "empty label"),
            ("web_1.svc", "not allowed"),
        ] {
            let e = PeerMatcher::new(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
            assert!(
                e.contains("spiffe://cluster.local/ns/shop/*") && e.contains("web.shop.svc"),
                "the allowed forms are named: {e}"
            );
        }
        let long = format!("spiffe://cluster.local/{}", "a".repeat(MAX_SPIFFE_ID));
        assert!(PeerMatcher::new(&long).is_err());
    }

    #[test]
    fn rules_round_trip_through_serde() {
        for rule in [
            "spiffe://cluster.local/ns/shop/*",
            "spiffe://cluster.local/*",
            "spiffe://cluster.local/ns/shop/sa/web",
            "web.shop.svc",
        ] {
            let json = serde_json::to_string(&m(rule)).unwrap();
            assert_eq!(json, format!("{rule:?}"));
            assert_eq!(serde_json::from_str::<PeerMatcher>(&json).unwrap(), m(rule));
        }
        let e = serde_json::from_str::<TlsConfig>(r#"{"allow":["api*"]}"#).unwrap_err();
        assert!(e.to_string().contains("matched exactly"), "{e}");
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
        c.allow = vec![m("web.shop.svc")];
        c.validate().unwrap();
        c.mode = TlsMode::Tls;
        assert!(c.validate().unwrap_err().to_string().contains("use mtls"));
        let parsed: TlsConfig = serde_json::from_str(
            r#"{"mode":"permissive","certs":"/c","min_version":"1.2","allow":["spiffe://td/ns/a/*"]}"#,
        )
        .unwrap();
        assert_eq!(parsed.min_version, TlsVersion::V1_2);
        assert!(serde_json::from_str::<TlsConfig>(r#"{"mode":"strict"}"#).is_err());
    }

    #[test]
    fn permissive_mode_takes_no_allow_list() {
        let mut c = TlsConfig {
            mode: TlsMode::Permissive,
            certs: Some("/c".into()),
            allow: vec![m("spiffe://td/ns/a/*")],
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        for needle in [
            "permissive",
            "without a certificate",
            "plaintext",
            "use mode mtls",
            "drop the list",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        c.allow.clear();
        c.validate().unwrap();
    }
}
