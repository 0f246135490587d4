//! Identities, trust domains and the names a certificate carries.
//!
//! An identity is a service `name` in a `namespace` of a trust domain. Its
//! certificate names it four ways (SPIFFE ID, DNS names, CN) and never in any
//! way the requester chose beyond the extra DNS names and IPs policy allows.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PkiError;

/// The default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Longest DNS name (RFC 1035, without the trailing dot).
const MAX_DNS_NAME: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;
/// Longest CommonName (RFC 5280 ub-common-name).
const MAX_COMMON_NAME: usize = 64;

/// Checks a Kubernetes-style DNS label (RFC 1123): 1–63 characters of
/// lower-case letters, digits and `-`, starting and ending with a letter or
/// digit. Names and namespaces must be labels so that they can never smuggle a
/// `/`, a `.` or a different case into a SPIFFE ID or DNS name.
pub fn validate_label(field: &'static str, value: &str) -> Result<(), PkiError> {
    let bad = |reason: &str| PkiError::InvalidName {
        field,
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    if value.is_empty() {
        return Err(bad("must not be empty"));
    }
    if value.len() > MAX_LABEL {
        return Err(bad("longer than 63 characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(bad(&format!(
            "character {c:?} not allowed: a DNS label holds only lower-case letters, digits and '-'"
        )));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

/// Checks a DNS name for a certificate SAN and returns it in lower case.
///
/// Rules: at most 253 characters, labels of 1–63 letters, digits and `-`
/// (not at either end), no empty label (so no `..`, leading or trailing dot)
/// and no wildcard: meshca names exactly one service per name.
pub fn validate_dns_name(value: &str) -> Result<String, PkiError> {
    let bad = |reason: String| PkiError::InvalidDnsName {
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if value.len() > MAX_DNS_NAME {
        return Err(bad(format!(
            "{} characters, more than the 253 allowed",
            value.len()
        )));
    }
    if value.contains('*') {
        return Err(bad("wildcards are not issued; name each service".into()));
    }
    for label in value.split('.') {
        if label.is_empty() {
            return Err(bad(
                "empty label (a leading, trailing or doubled '.')".into()
            ));
        }
        if label.len() > MAX_LABEL {
            return Err(bad(format!("label {label:?} is longer than 63 characters")));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(bad(format!(
                "character {c:?} not allowed: only letters, digits, '-' and '.'"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad(format!(
                "label {label:?} must start and end with a letter or digit"
            )));
        }
    }
    Ok(value.to_ascii_lowercase())
}

/// Parses an IP SAN.
pub fn parse_ip(value: &str) -> Result<IpAddr, PkiError> {
    IpAddr::from_str(value).map_err(|_| PkiError::InvalidIp {
        value: value.to_owned(),
    })
}

/// A validated trust domain: a lower-case DNS name such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain.
    pub fn new(value: &str) -> Result<Self, PkiError> {
        let as_name = validate_dns_name(value).map_err(|e| PkiError::InvalidName {
            field: "trust domain",
            value: value.to_owned(),
            reason: match e {
                PkiError::InvalidDnsName { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
        if as_name != value {
            return Err(PkiError::InvalidName {
                field: "trust domain",
                value: value.to_owned(),
                reason: "must be lower case".into(),
            });
        }
        Ok(TrustDomain(as_name))
    }

    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        TrustDomain(DEFAULT_TRUST_DOMAIN.to_owned())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = PkiError;
    fn try_from(s: String) -> Result<Self, PkiError> {
        TrustDomain::new(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}

/// The namespace of meshca's own identities (the CA server, the admin). No
/// join token, workload renewal or policy rule may name it: a workload that
/// held a name in it could pose as the CA.
pub const RESERVED_NAMESPACE: &str = "meshca-system";

/// A workload identity: a service `name` in a `namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    namespace: String,
    name: String,
}

impl Identity {
    /// Validates both parts (each a DNS label).
    pub fn new(namespace: &str, name: &str) -> Result<Self, PkiError> {
        validate_label("name", name)?;
        validate_label("namespace", namespace)?;
        Ok(Identity {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Whether it is one of meshca's own identities ([`RESERVED_NAMESPACE`]).
    pub fn is_reserved(&self) -> bool {
        self.namespace == RESERVED_NAMESPACE
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `spiffe://<td>/ns/<ns>/sa/<name>`.
    pub fn spiffe_id(&self, td: &TrustDomain) -> String {
        format!("spiffe://{td}/ns/{}/sa/{}", self.namespace, self.name)
    }

    /// `<name>.<ns>.svc` and `<name>.<ns>.svc.<td>`.
    pub fn dns_names(&self, td: &TrustDomain) -> Vec<String> {
        let (n, ns) = (&self.name, &self.namespace);
        // Not the bare `<name>` nor `<name>.<ns>`: a workload named
        // `localhost`, or `db` in two namespaces, or `google` in namespace
        // `com`, would carry a name that means another host or another
        // identity. `<name>.<ns>.svc[.<td>]` names exactly one identity.
        vec![format!("{n}.{ns}.svc"), format!("{n}.{ns}.svc.{td}")]
    }

    /// The CommonName, `<name>.<ns>.svc.<td>`, or `None` when it would be longer
    /// than the 64 characters X.509 allows (the SANs carry the names then).
    pub fn common_name(&self, td: &TrustDomain) -> Option<String> {
        let cn = format!("{}.{}.svc.{td}", self.name, self.namespace);
        (cn.len() <= MAX_COMMON_NAME).then_some(cn)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The subject alternative names of a leaf, as meshca decided them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SanSet {
    /// The SPIFFE ID (a URI SAN).
    pub uri: String,
    /// DNS names, identity names first, without duplicates.
    pub dns: Vec<String>,
    /// IP addresses, without duplicates.
    pub ips: Vec<IpAddr>,
}

impl SanSet {
    /// Builds the SANs of `identity` plus the extra names, each validated.
    /// Names asked for twice (or already implied by the identity) appear once.
    pub fn build(
        identity: &Identity,
        td: &TrustDomain,
        extra_dns: &[String],
        extra_ips: &[String],
    ) -> Result<Self, PkiError> {
        let mut dns = identity.dns_names(td);
        for d in extra_dns {
            let d = validate_dns_name(d)?;
            if !dns.contains(&d) {
                dns.push(d);
            }
        }
        let mut ips = Vec::new();
        for ip in extra_ips {
            let ip = parse_ip(ip)?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Ok(SanSet {
            uri: identity.spiffe_id(td),
            dns,
            ips,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identity_names() {
        let td = TrustDomain::default();
        let id = Identity::new("shop", "web").unwrap();
        assert_eq!(id.spiffe_id(&td), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            id.dns_names(&td),
            ["web.shop.svc", "web.shop.svc.cluster.local"]
        );
        assert_eq!(id.common_name(&td).unwrap(), "web.shop.svc.cluster.local");
        let long = Identity::new("n".repeat(50).as_str(), "web").unwrap();
        assert_eq!(long.common_name(&td), None);
    }

    #[test]
    fn labels_refuse_what_could_escape() {
        for bad in [
            "",
            "Web",
            "a/b",
            "..",
            "a.b",
            "-a",
            "a-",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            let e = Identity::new("default", bad).unwrap_err();
            assert!(e.to_string().contains("invalid name"), "{bad}: {e}");
            let e = Identity::new(bad, "web").unwrap_err();
            assert!(e.to_string().contains("invalid namespace"), "{bad}: {e}");
        }
        assert!(Identity::new("a", &"a".repeat(63)).is_ok());
    }

    #[test]
    fn dns_names_follow_rfc1035() {
        let long_label = "a".repeat(64);
        let long_name = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ]
        .join(".");
        for bad in [
            "a b",
            "a..b",
            ".a",
            "a.",
            "*.example.com",
            "-a.com",
            "a-.com",
            "a_b.com",
            "",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(validate_dns_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate_dns_name("API.Example.com").unwrap(),
            "api.example.com"
        );
        assert!(validate_dns_name("a-1.b2.c").is_ok());
    }

    #[test]
    fn san_set_dedups_and_validates() {
        let td = TrustDomain::default();
        let id = Identity::new("default", "web").unwrap();
        let s = SanSet::build(
            &id,
            &td,
            &["web.default.svc".into(), "web.example.com".into()],
            &["10.0.0.1".into(), "10.0.0.1".into(), "::1".into()],
        )
        .unwrap();
        assert_eq!(s.dns.len(), 3);
        assert_eq!(s.ips.len(), 2);
        assert!(SanSet::build(&id, &td, &[], &["10.0.0.300".into()]).is_err());
        assert!(SanSet::build(&id, &td, &["a..b".into()], &[]).is_err());
    }

    #[test]
    fn trust_domains() {
        assert!(TrustDomain::new("example.org").is_ok());
        assert!(TrustDomain::new("Example.org").is_err());
        assert!(TrustDomain::new("a/b").is_err());
    }

    proptest! {
        #[test]
        fn accepted_labels_are_safe(s in "\\PC{0,70}") {
            if validate_label("name", &s).is_ok() {
                prop_assert!(!s.contains('/') && !s.contains('.') && s.len() <= 63);
                prop_assert_eq!(s.to_ascii_lowercase(), s);
            }
        }

        #[test]
        fn accepted_dns_names_are_valid(s in "[a-zA-Z0-9.*_ -]{0,300}") {
            if let Ok(n) = validate_dns_name(&s) {
                prop_assert!(n.len() <= 253);
                prop_assert!(n.split('.').all(|l| !l.is_empty() && l.len() <= 63));
                prop_assert!(!n.contains('*') && !n.contains(' '));
            }
        }
    }
}
