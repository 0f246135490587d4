//! Authorization policy for workloads: which extra names, lifetimes,
//! profiles and key types an identity may ask for. The admin is bound only
//! by the global maximum lifetime.

use std::net::IpAddr;

use meshca_pki::{GoDuration, KeyType, Profile};
use serde::{Deserialize, Serialize};

use crate::{IssueRequest, IssuerError, KeySource};

/// One rule of the `[[policy]]` list in `meshca.toml`. The most specific rule
/// for an identity applies (namespace and name, then namespace, then `*`);
/// with no rule, a workload gets no extra names and the profiles service,
/// server and client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// The namespace, or `*` for every namespace.
    pub namespace: String,
    /// One name in the namespace (all names when absent).
    #[serde(default)]
    pub name: Option<String>,
    /// Extra DNS names allowed; `*.example.com` allows any name under example.com.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Extra IPs allowed: addresses or CIDR blocks (`10.0.0.0/8`).
    #[serde(default)]
    pub ips: Vec<String>,
    /// The longest lifetime allowed (else the global maximum).
    #[serde(default)]
    pub max_ttl: Option<GoDuration>,
    /// Profiles allowed (else service, server, client).
    #[serde(default)]
    pub profiles: Option<Vec<Profile>>,
    /// Key types allowed for CA-generated keys and CSRs (else all).
    #[serde(default)]
    pub key_types: Option<Vec<KeyType>>,
}

impl PolicyRule {
    fn describe(&self, index: usize) -> String {
        match &self.name {
            Some(n) => format!(
                "policy rule #{} (namespace {}, name {n})",
                index + 1,
                self.namespace
            ),
            None => format!("policy rule #{} (namespace {})", index + 1, self.namespace),
        }
    }

    /// Checks the rule's own fields, and that it can match at all: a rule
    /// that never matches would silently leave the identities its author
    /// meant under the default policy.
    pub fn validate(&self, index: usize) -> Result<(), String> {
        let what = self.describe(index);
        if self.namespace == "*" {
            if let Some(n) = &self.name {
                return Err(format!(
                    "{what}: `name = {n:?}` with `namespace = \"*\"` never matches (rules pick a name only within one namespace); name the namespace, or drop `name` to cover every identity"
                ));
            }
        } else {
            meshca_pki::Identity::new(&self.namespace, self.name.as_deref().unwrap_or("x"))
                .map_err(|e| format!("{what}: never matches: {e}"))?;
        }
        if self.namespace == crate::ADMIN_NAMESPACE {
            return Err(format!(
                "{what}: namespace {} is reserved for meshca itself; no policy rule may name it",
                crate::ADMIN_NAMESPACE
            ));
        }
        for ip in &self.ips {
            parse_cidr(ip).ok_or_else(|| {
                format!(
                    "{}: ips entry {ip:?} is not an address or CIDR block",
                    self.describe(index)
                )
            })?;
        }
        for d in &self.dns {
            let bare = d.strip_prefix("*.").unwrap_or(d);
            if bare.contains('*') {
                return Err(format!(
                    "{what}: dns entry {d:?} never matches: `*` is allowed only as a whole first label (`*.example.com`)"
                ));
            }
            if bare.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "{what}: dns entry {d:?} never matches: names are compared in lower case; write {:?}",
                    d.to_ascii_lowercase()
                ));
            }
            meshca_pki::validate_dns_name(bare).map_err(|e| format!("{what}: dns entry: {e}"))?;
        }
        Ok(())
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, l.parse::<u8>().ok()?),
        None => {
            let a = s.parse::<IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn in_cidr(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    let bits = |a: IpAddr| -> (u128, u8) {
        match a {
            IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
            IpAddr::V6(v) => (u128::from(v), 128),
        }
    };
    let ((a, wa), (b, wb)) = (bits(ip), bits(net));
    if wa != wb {
        return false;
    }
    let shift = u32::from(wa - len);
    len == 0 || (a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0))
}

fn dns_allowed(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
        None => p.eq_ignore_ascii_case(name),
    })
}

/// Names no policy rule can give a workload: `localhost` (clients connect
/// to it trusting it is themselves), and names of the identity form
/// `<name>.<ns>.svc[...]` that are not the workload's own (they would make
/// it another identity to anyone matching DNS names).
fn never_for_a_workload(name: &str, id: &meshca_pki::Identity) -> Option<&'static str> {
    if name == "localhost" || name.ends_with(".localhost") {
        return Some("localhost names mean the caller's own host");
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() >= 3
        && labels[2] == "svc"
        && (labels[0] != id.name() || labels[1] != id.namespace())
    {
        return Some("names of the form <name>.<namespace>.svc belong to that meshca identity");
    }
    None
}

/// Checks a workload's request against `rules`. The error names the rule.
pub fn check_workload(rules: &[PolicyRule], req: &IssueRequest) -> Result<(), IssuerError> {
    let id = req.identity();
    let pick = |exact: bool| {
        rules.iter().enumerate().find(|(_, r)| {
            let ns_ok = r.namespace == id.namespace() || (!exact && r.namespace == "*");
            let name_ok = match &r.name {
                Some(n) => exact && n == id.name(),
                None => !exact,
            };
            ns_ok && name_ok
        })
    };
    let chosen = pick(true)
        .or_else(|| {
            rules
                .iter()
                .enumerate()
                .find(|(_, r)| r.name.is_none() && r.namespace == id.namespace())
        })
        .or_else(|| pick(false));
    let (what, dns, ips, max_ttl, profiles, key_types): (String, &[String], &[String], _, _, _) =
        match chosen {
            Some((i, r)) => (
                r.describe(i),
                &r.dns,
                &r.ips,
                r.max_ttl,
                r.profiles.clone(),
                r.key_types.clone(),
            ),
            None => (
                "the default policy (no rule for this identity)".to_owned(),
                &[],
                &[],
                None,
                None,
                None,
            ),
        };
    let refuse = |why: String| Err(IssuerError::Policy(format!("{why} for {id}, by {what}")));
    for d in req.extra_dns() {
        let d = d.to_ascii_lowercase();
        if let Some(why) = never_for_a_workload(&d, id) {
            return refuse(format!("DNS name {d:?} is not allowed: {why}"));
        }
        if !dns_allowed(&d, dns) {
            return refuse(format!("DNS name {d:?} is not allowed"));
        }
    }
    for ip in req.extra_ips() {
        let Ok(addr) = ip.parse::<IpAddr>() else {
            continue;
        }; // the authority reports bad IPs
        if !ips
            .iter()
            .filter_map(|c| parse_cidr(c))
            .any(|c| in_cidr(addr, c))
        {
            return refuse(format!("IP address {ip} is not allowed"));
        }
    }
    let profiles =
        profiles.unwrap_or_else(|| vec![Profile::Service, Profile::Server, Profile::Client]);
    if !profiles.contains(&req.requested_profile()) {
        return refuse(format!(
            "profile {} is not allowed",
            req.requested_profile()
        ));
    }
    // Without a rule's max_ttl a workload or a token gets at most its
    // profile's default lifetime: a one-use join token must not buy a
    // certificate that outlives everything by asking for `87600h`.
    // Long-lived profiles (bootstrap, webhook: 87600h) are capped at the
    // service profile's default too, unless a rule says how long.
    let default = req
        .requested_profile()
        .default_ttl()
        .min(Profile::Service.default_ttl());
    if max_ttl.is_none()
        && req.requested_ttl().is_none()
        && req.requested_profile().default_ttl() > default
    {
        return refuse(format!(
            "profile {}'s default lifetime of {} is longer than a workload or token gets without a rule (set max_ttl in a policy rule, or ask for a ttl of at most {})",
            req.requested_profile(),
            meshca_pki::format_duration(req.requested_profile().default_ttl()),
            meshca_pki::format_duration(default)
        ));
    }
    if let Some(ttl) = req.requested_ttl() {
        match max_ttl {
            Some(max) if ttl > max.get() => {
                return refuse(format!(
                    "ttl {} is longer than the {} allowed (the rule's max_ttl)",
                    meshca_pki::format_duration(ttl),
                    max
                ));
            }
            None if ttl > default => {
                return refuse(format!(
                    "ttl {} is longer than the profile {}'s default of {} (set max_ttl in a policy rule to allow more)",
                    meshca_pki::format_duration(ttl),
                    req.requested_profile(),
                    meshca_pki::format_duration(default)
                ));
            }
            _ => {}
        }
    }
    if let Some(max) = max_ttl {
        if req.requested_ttl().is_none() && req.requested_profile().default_ttl() > max.get() {
            return refuse(format!(
                "the profile's default ttl is longer than the {max} allowed"
            ));
        }
    }
    if let Some(kts) = key_types {
        let kt = match req.key_source() {
            KeySource::Csr(c) => c.key_type(),
            KeySource::Generate(k) => *k,
        };
        if !kts.contains(&kt) {
            return refuse(format!("key type {kt} is not allowed"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> PolicyRule {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn rules_allow_and_refuse_naming_the_rule() {
        let rules = vec![
            rule(
                "namespace = \"shop\"\ndns = [\"*.shop.example.com\"]\nips = [\"10.0.0.0/8\"]\nmax_ttl = \"48h\"",
            ),
            rule("namespace = \"shop\"\nname = \"web\"\ndns = [\"www.example.com\"]"),
        ];
        let req = |ns: &str, name: &str| IssueRequest::new(ns, name).unwrap();
        check_workload(
            &rules,
            &req("shop", "cart")
                .dns(vec!["a.shop.example.com".into()])
                .ips(vec!["10.1.2.3".into()]),
        )
        .unwrap();
        let e = check_workload(
            &rules,
            &req("shop", "cart").dns(vec!["shop.example.com".into()]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("policy rule #1"), "{e}");
        let e = check_workload(&rules, &req("shop", "cart").ips(vec!["192.168.0.1".into()]))
            .unwrap_err();
        assert!(e.to_string().contains("192.168.0.1"), "{e}");
        check_workload(
            &rules,
            &req("shop", "web").dns(vec!["www.example.com".into()]),
        )
        .unwrap();
        let e = check_workload(
            &rules,
            &req("shop", "web").dns(vec!["a.shop.example.com".into()]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("policy rule #2"), "{e}");
        let e = check_workload(&rules, &req("bank", "x").dns(vec!["x.example.com".into()]))
            .unwrap_err();
        assert!(e.to_string().contains("default policy"), "{e}");
        let e = check_workload(
            &rules,
            &req("shop", "cart").ttl(Some(std::time::Duration::from_secs(72 * 3600))),
        )
        .unwrap_err();
        assert!(e.to_string().contains("48h"), "{e}");
        let e = check_workload(&rules, &req("bank", "x").profile(Profile::Bootstrap)).unwrap_err();
        assert!(e.to_string().contains("profile bootstrap"), "{e}");
    }

    #[test]
    fn cidrs() {
        let c = parse_cidr("10.0.0.0/8").unwrap();
        assert!(in_cidr("10.255.0.1".parse().unwrap(), c));
        assert!(!in_cidr("11.0.0.1".parse().unwrap(), c));
        assert!(in_cidr("::1".parse().unwrap(), parse_cidr("::1").unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_none());
    }
}
