//! Identity attacks against the API, each refused (or its trick ignored)
//! and each refusal in the audit log: a workload asking for another
//! identity, wildcards, SANs outside policy, a foreign trust domain, CSR
//! names, hostile characters, look-alike names, revoked and expired
//! certificates renewing, tokens reused, expired or used for another name.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::SystemTime;

use serde_json::Value;

use crate::common::*;
use crate::refusal::{CERTIFICATE_EXPIRED, api_error, curl_alert, still_serving};

/// A token's `expires_at` (RFC 3339, as `token create --json` gives it).
fn expires_at(token: &Value) -> SystemTime {
    let at = token["expires_at"].as_str().unwrap();
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("expires_at {at:?}: {e}"))
        .into()
}

/// The audit log, one JSON value per line.
fn audit(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

#[test]
fn identity_attacks_are_refused_and_audited() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    // One policy rule: web's namespace may have extra names under
    // shop.example.com. Malformed names there are refused by the DNS-label
    // rules, not merely for being outside the policy.
    ok(&["init", "--dir", d.to_str().unwrap()]);
    let conf = d.join("meshca.toml");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\n[[policy]]\nnamespace = \"default\"\ndns = [\"*.shop.example.com\"]\n");
    std::fs::write(&conf, text).unwrap();
    let srv = Server::start(&d, &[]);
    let web = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    let as_web = cert_args(&web);
    let (csr, _) = openssl_csr(tmp.path(), "web", &[]);
    // Each attack gets exactly `status` with `error.code` `code`, a message
    // that says `says`, and an audit line that refuses it with that message.
    // Returns the audit lines the attack added.
    let attack = |who: &[String], body: String, status: u16, code: &str, says: &str, why: &str| {
        let before = audit(&d).len();
        let got = srv.curl("POST", "/v1/sign", Some(&body), who);
        let message = api_error(&got, status, code, why);
        assert!(
            message.contains(says),
            "{why}: the refusal does not say {says:?}: {message}"
        );
        let added = audit(&d).split_off(before);
        assert!(
            added
                .iter()
                .any(|l| l["outcome"] == "refused" && l["reason"] == message.as_str()),
            "{why}: not audited as refused with {message:?}: {added:?}"
        );
        added
    };
    let sign = |extra: &str| format!(r#"{{"csr":{csr}{extra}}}"#);

    // Another identity, wildcards, names outside policy, another trust domain.
    attack(
        &as_web,
        sign(r#","name":"db""#),
        403,
        "forbidden",
        "default/web may not obtain a certificate for default/db",
        "another identity",
    );
    attack(
        &as_web,
        sign(r#","name":"web","namespace":"kube-system""#),
        403,
        "forbidden",
        "default/web may not obtain a certificate for kube-system/web",
        "another namespace",
    );
    attack(
        &as_web,
        sign(r#","name":"web","dns":["*.default.svc"]"#),
        403,
        "policy",
        r#"DNS name "*.default.svc" is not allowed: names of the form <name>.<namespace>.svc belong to that meshca identity"#,
        "a wildcard over the identities' names",
    );
    attack(
        &as_web,
        sign(r#","name":"web","dns":["*.shop.example.com"]"#),
        400,
        "bad_request",
        "wildcards are not issued",
        "a wildcard where policy allows names",
    );
    attack(
        &as_web,
        sign(r#","name":"web","dns":["evil.example.com"]"#),
        403,
        "policy",
        r#"DNS name "evil.example.com" is not allowed for default/web, by policy rule #1"#,
        "an extra SAN outside policy",
    );
    attack(
        &as_web,
        sign(r#","name":"web","ips":["10.0.0.1"]"#),
        403,
        "policy",
        "IP address 10.0.0.1 is not allowed for default/web, by policy rule #1",
        "an extra IP outside policy",
    );
    // The API has no field for URI SANs: a request that names one is
    // malformed, so no URI ever comes from a caller.
    attack(
        &as_web,
        sign(r#","name":"web","uris":["spiffe://other.domain/ns/default/sa/web"]"#),
        400,
        "bad_request",
        "unknown field `uris`",
        "a URI SAN of another trust domain",
    );
    // Hostile characters and look-alikes, in the name, the namespace and SANs.
    let label_rule = "a DNS label holds only lower-case letters, digits and '-'";
    for name in [
        r#"web\""#,
        "web}",
        "web%2Fdb",
        "we.*",
        "web$",
        "a/b",
        "..",
        "web\\u0000",
        "web\\n",
        "w\u{0435}b",
        "wéb",
        "WEB",
    ] {
        let why = format!("name {name:?}");
        let added = attack(
            &as_web,
            sign(&format!(r#","name":"{name}""#)),
            400,
            "bad_request",
            "invalid name",
            &why,
        );
        assert!(
            added
                .iter()
                .any(|l| l["reason"].as_str().is_some_and(|r| r.contains(label_rule))),
            "{why}: not refused by the DNS-label rule: {added:?}"
        );
    }
    for ns in ["default/..", "..", "default%2F", "kube-system\\n"] {
        let why = format!("namespace {ns:?}");
        let added = attack(
            &as_web,
            sign(&format!(r#","name":"web","namespace":"{ns}""#)),
            400,
            "bad_request",
            "invalid namespace",
            &why,
        );
        assert!(
            added
                .iter()
                .any(|l| l["reason"].as_str().is_some_and(|r| r.contains(label_rule))),
            "{why}: not refused by the DNS-label rule: {added:?}"
        );
    }
    // Outside what policy allows: refused by the policy, whatever they hold.
    for (dns, says) in [
        ("xn--80ak6aa92e.com", "is not allowed for default/web"),
        (
            "w\u{0435}b.default.svc",
            "names of the form <name>.<namespace>.svc belong to that meshca identity",
        ),
        (
            "web.default.svc\\u0000.evil",
            "is not allowed for default/web",
        ),
        ("a..b", "is not allowed for default/web"),
    ] {
        attack(
            &as_web,
            sign(&format!(r#","name":"web","dns":["{dns}"]"#)),
            403,
            "policy",
            says,
            &format!("dns {dns:?}"),
        );
    }
    // Where policy would allow the name: refused by the DNS-name rules.
    for (dns, says) in [
        ("a..b.shop.example.com", "empty label"),
        (
            "w\u{0435}b.shop.example.com",
            "character '\u{0435}' not allowed",
        ),
        ("web\\u0000.shop.example.com", "character '\\0' not allowed"),
    ] {
        attack(
            &as_web,
            sign(&format!(r#","name":"web","dns":["{dns}"]"#)),
            400,
            "bad_request",
            &format!(
                "invalid DNS name \"{}\": {says}",
                dns.replace("\\u0000", "\\0")
            ),
            &format!("dns {dns:?} under an allowed suffix"),
        );
    }

    // A CSR that claims another identity in its subject and SANs: its names
    // are ignored, the certificate carries the caller's identity only.
    let (evil, _) = openssl_csr(
        tmp.path(),
        "evil",
        &[
            "-subj",
            "/CN=db.default.svc.cluster.local",
            "-addext",
            "subjectAltName=DNS:db.default.svc,URI:spiffe://cluster.local/ns/default/sa/db,DNS:*.default.svc",
        ],
    );
    let (code, answer) = srv.curl(
        "POST",
        "/v1/sign",
        Some(&format!(r#"{{"name":"web","csr":{evil}}}"#)),
        &as_web,
    );
    assert_eq!(code, 200, "{answer}");
    let cert = tmp.path().join("evil.crt");
    std::fs::write(
        &cert,
        serde_json::from_str::<Value>(&answer).unwrap()["certificate"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let text = tool(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"],
    );
    assert!(
        !text.contains("db.default") && !text.contains("sa/db") && !text.contains('*'),
        "{text}"
    );
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );

    // Tokens: reused, expired, and for another identity.
    let token_json = |name: &str, ttl: &str| -> Value {
        serde_json::from_str(&srv.cli_ok(&["token", "create", name, "--ttl", ttl, "--json"]))
            .unwrap()
    };
    let token = |name: &str, ttl: &str| -> String {
        token_json(name, ttl)["token"].as_str().unwrap().to_owned()
    };
    // What the token-use audit line gives as the reason (the caller is told
    // only "unknown, expired or used up").
    let token_refused = |added: &[Value], reason: &str, why: &str| {
        assert!(
            added.iter().any(|l| l["action"] == "token-use"
                && l["outcome"] == "refused"
                && l["reason"] == reason),
            "{why}: no token-use refusal {reason:?} in {added:?}"
        );
    };
    let one = token("api", "1h");
    let (code, answer) = srv.curl(
        "POST",
        "/v1/sign",
        Some(&sign(r#","name":"api""#)),
        &bearer(&one),
    );
    assert_eq!(code, 200, "{answer}");
    let added = attack(
        &bearer(&one),
        sign(r#","name":"api""#),
        401,
        "unauthenticated",
        "the join token is unknown, expired or used up",
        "a token used again",
    );
    token_refused(&added, "used_up", "a token used again");
    let other = token("api2", "1h");
    attack(
        &bearer(&other),
        sign(r#","name":"db""#),
        403,
        "forbidden",
        "this join token is for default/api2, not default/db",
        "a token for another identity",
    );
    let short = token_json("api3", "1s");
    // Past its own expiry time (not a guess at it).
    wait_past(expires_at(&short));
    let short = short["token"].as_str().unwrap().to_owned();
    let added = attack(
        &bearer(&short),
        sign(r#","name":"api3""#),
        401,
        "unauthenticated",
        "the join token is unknown, expired or used up",
        "an expired token",
    );
    token_refused(&added, "expired", "an expired token");

    // A revoked certificate renewing.
    let serial = tool(
        "openssl",
        &[
            "x509",
            "-in",
            web.join("tls.crt").to_str().unwrap(),
            "-noout",
            "-serial",
        ],
    );
    let serial = serial.trim().trim_start_matches("serial=").to_lowercase();
    srv.cli_ok(&["revoke", &serial]);
    attack(
        &as_web,
        sign(r#","name":"web""#),
        401,
        "unauthenticated",
        &format!("client certificate {serial} is revoked"),
        "a revoked certificate renewing",
    );

    // An expired certificate renewing: refused in the TLS handshake, with
    // the alert that says so.
    let brief = tmp.path().join("brief");
    srv.cli_ok(&[
        "issue",
        "brief",
        "--ttl",
        "1s",
        "--out",
        brief.to_str().unwrap(),
    ]);
    // Past its notAfter (one-second precision, inclusive: `wait_past`).
    wait_past(validity(&brief.join("tls.crt")).1);
    let mut args = vec![
        "--cacert".to_owned(),
        d.join("admin/ca.crt").to_str().unwrap().to_owned(),
    ];
    args.extend(cert_args(&brief));
    args.extend([
        "-H".to_owned(),
        "Content-Type: application/json".to_owned(),
        "--data-binary".to_owned(),
        sign(r#","name":"brief""#),
    ]);
    curl_alert(
        &format!("{}/v1/sign", srv.url()),
        &args,
        CERTIFICATE_EXPIRED,
        "an expired certificate renewing",
    );
    still_serving(&srv, "after the identity attacks");
}
