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
    if let Some(max) = max_ttl
        && req.requested_ttl().is_none()
        && req.requested_profile().default_ttl() > max.get()
    {
        return refuse(format!(
            "the profile's default ttl is longer than the {max} allowed"
        ));
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

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    fn req(ns: &str, name: &str) -> IssueRequest {
        IssueRequest::new(ns, name).unwrap()
    }

    #[track_caller]
    fn refused(rules: &[PolicyRule], r: &IssueRequest, says: &str) {
        let e = check_workload(rules, r).unwrap_err();
        assert!(matches!(e, IssuerError::Policy(_)), "{e:?}");
        assert!(e.to_string().contains(says), "{e}");
    }

    #[test]
    fn rules_that_cannot_match_or_name_meshca_are_refused() {
        rule("namespace = \"shop\"").validate(0).unwrap();
        rule("namespace = \"*\"").validate(0).unwrap();
        rule("namespace = \"shop\"\nname = \"web\"\ndns = [\"*.example.com\", \"a.example.com\"]\nips = [\"10.0.0.0/8\", \"::1\"]")
            .validate(0)
            .unwrap();
        for (text, says) in [
            (
                "namespace = \"*\"\nname = \"web\"",
                "policy rule #3 (namespace *, name web): `name = \"web\"` with `namespace = \"*\"` never matches",
            ),
            (
                "namespace = \"Shop\"",
                "policy rule #3 (namespace Shop): never matches",
            ),
            ("namespace = \"shop\"\nname = \"a_b\"", "never matches"),
            (
                "namespace = \"meshca-system\"",
                "namespace meshca-system is reserved",
            ),
            (
                "namespace = \"meshca-system\"\nname = \"admin\"",
                "is reserved",
            ),
            (
                "namespace = \"shop\"\nips = [\"10.0.0.0/33\"]",
                "ips entry \"10.0.0.0/33\" is not an address or CIDR block",
            ),
            (
                "namespace = \"shop\"\ndns = [\"a.*.example.com\"]",
                "`*` is allowed only as a whole first label",
            ),
            (
                "namespace = \"shop\"\ndns = [\"*.*.example.com\"]",
                "`*` is allowed only as a whole first label",
            ),
            (
                "namespace = \"shop\"\ndns = [\"A.example.com\"]",
                "write \"a.example.com\"",
            ),
            (
                "namespace = \"shop\"\ndns = [\"-a.example.com\"]",
                "dns entry",
            ),
        ] {
            let e = rule(text).validate(2).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_wildcard_covers_names_under_its_suffix_only() {
        let p = vec![
            "*.shop.example.com".to_owned(),
            "exact.example.com".to_owned(),
        ];
        for name in [
            "a.shop.example.com",
            "a.b.shop.example.com",
            "exact.example.com",
            "EXACT.example.com",
        ] {
            assert!(dns_allowed(name, &p), "{name}");
        }
        for name in [
            "shop.example.com",
            ".shop.example.com",
            "evilshop.example.com",
            "a.shop.example.com.evil",
            "a.exact.example.com",
            "xexact.example.com",
        ] {
            assert!(!dns_allowed(name, &p), "{name}");
        }
    }

    #[test]
    fn localhost_and_other_identities_names_are_never_a_workloads() {
        let rules = vec![rule(
            "namespace = \"shop\"\ndns = [\"*.svc\", \"*.shop.svc\", \"localhost\", \"*.localhost\", \"*.cluster.local\"]",
        )];
        let id = |d: &str| req("shop", "web").dns(vec![d.to_owned()]);
        for d in ["localhost", "a.localhost"] {
            refused(&rules, &id(d), "localhost names mean the caller's own host");
        }
        for d in [
            "api.shop.svc",
            "web.bank.svc",
            "web.bank.svc.cluster.local",
            "API.shop.svc",
        ] {
            refused(&rules, &id(d), "belong to that meshca identity");
        }
        // Its own, and names that only look alike.
        for d in [
            "web.shop.svc",
            "web.shop.svc.cluster.local",
            "a.svc",
            "x.web.shop.svc",
        ] {
            check_workload(&rules, &id(d)).unwrap();
        }
    }

    #[test]
    fn the_most_specific_rule_applies() {
        let rules = vec![
            rule("namespace = \"*\"\ndns = [\"*.any.example\"]"),
            rule("namespace = \"shop\"\ndns = [\"*.shop.example\"]"),
            rule("namespace = \"shop\"\nname = \"web\"\ndns = [\"*.web.example\"]"),
        ];
        let with = |ns: &str, name: &str, d: &str| req(ns, name).dns(vec![d.to_owned()]);
        check_workload(&rules, &with("bank", "x", "a.any.example")).unwrap();
        refused(
            &rules,
            &with("bank", "x", "a.shop.example"),
            "policy rule #1 (namespace *)",
        );
        check_workload(&rules, &with("shop", "cart", "a.shop.example")).unwrap();
        refused(
            &rules,
            &with("shop", "cart", "a.any.example"),
            "policy rule #2 (namespace shop)",
        );
        check_workload(&rules, &with("shop", "web", "a.web.example")).unwrap();
        refused(
            &rules,
            &with("shop", "web", "a.shop.example"),
            "policy rule #3 (namespace shop, name web)",
        );
        // A rule for one name never covers its namespace's other names.
        let only_web = vec![rule(
            "namespace = \"shop\"\nname = \"web\"\ndns = [\"*.web.example\"]",
        )];
        refused(
            &only_web,
            &with("shop", "cart", "a.web.example"),
            "the default policy",
        );
    }

    #[test]
    fn lifetimes_are_bounded_from_both_sides_of_each_limit() {
        let none: Vec<PolicyRule> = Vec::new();
        let day = 24 * HOUR;
        let ttl = |t: std::time::Duration| req("shop", "web").ttl(Some(t));
        // No rule: at most the profile's default, that included.
        check_workload(&none, &req("shop", "web")).unwrap();
        check_workload(&none, &ttl(day)).unwrap();
        check_workload(&none, &ttl(HOUR)).unwrap();
        refused(
            &none,
            &ttl(day + std::time::Duration::from_secs(1)),
            "longer than the profile service's default of 24h",
        );
        // A rule's max_ttl: up to it, that included.
        let max = vec![rule("namespace = \"shop\"\nmax_ttl = \"48h\"")];
        check_workload(&max, &ttl(48 * HOUR)).unwrap();
        check_workload(&max, &ttl(HOUR)).unwrap();
        refused(&max, &ttl(49 * HOUR), "longer than the 48h allowed");
        // A profile whose default is long: refused without a ttl unless a
        // rule allows that long; a rule with max_ttl equal to the default
        // is enough.
        let long = vec![rule(
            "namespace = \"shop\"\nprofiles = [\"webhook\", \"service\"]",
        )];
        let webhook = req("shop", "web").profile(Profile::Webhook);
        refused(
            &long,
            &webhook,
            "profile webhook's default lifetime of 87600h is longer",
        );
        check_workload(&long, &webhook.clone().ttl(Some(day))).unwrap();
        check_workload(&long, &req("shop", "web")).unwrap();
        let exact = vec![rule(
            "namespace = \"shop\"\nprofiles = [\"webhook\"]\nmax_ttl = \"87600h\"",
        )];
        check_workload(&exact, &webhook).unwrap();
        let short = vec![rule(
            "namespace = \"shop\"\nprofiles = [\"webhook\"]\nmax_ttl = \"48h\"",
        )];
        refused(
            &short,
            &webhook,
            "the profile's default ttl is longer than the 48h allowed",
        );
        let service_max = vec![rule("namespace = \"shop\"\nmax_ttl = \"24h\"")];
        check_workload(&service_max, &req("shop", "web")).unwrap();
    }

    #[test]
    fn profiles_and_key_types_are_those_the_rule_lists() {
        let none: Vec<PolicyRule> = Vec::new();
        for p in [Profile::Service, Profile::Server, Profile::Client] {
            check_workload(&none, &req("shop", "web").profile(p)).unwrap();
        }
        refused(
            &none,
            &req("shop", "web").profile(Profile::Bootstrap),
            "profile bootstrap is not allowed",
        );
        let rules = vec![rule(
            "namespace = \"shop\"\nprofiles = [\"client\"]\nkey_types = [\"ed25519\"]",
        )];
        refused(
            &rules,
            &req("shop", "web").generate_key(KeyType::Ed25519),
            "profile service is not allowed",
        );
        let client = |k: KeyType| req("shop", "web").profile(Profile::Client).generate_key(k);
        check_workload(&rules, &client(KeyType::Ed25519)).unwrap();
        refused(
            &rules,
            &client(KeyType::EcdsaP256),
            "key type ecdsa-p256 is not allowed",
        );
    }

    #[test]
    fn extra_ips_must_fall_in_the_rules_blocks() {
        let rules = vec![rule(
            "namespace = \"shop\"\nips = [\"10.0.0.0/8\", \"fd00::/8\"]",
        )];
        let ip = |a: &str| req("shop", "web").ips(vec![a.to_owned()]);
        for a in ["10.0.0.1", "10.255.255.255", "fd12::1"] {
            check_workload(&rules, &ip(a)).unwrap();
        }
        for a in ["11.0.0.1", "9.255.255.255", "fe00::1", "::ffff:10.0.0.1"] {
            refused(&rules, &ip(a), &format!("IP address {a} is not allowed"));
        }
        let none: Vec<PolicyRule> = Vec::new();
        refused(&none, &ip("10.0.0.1"), "by the default policy");
    }
}
