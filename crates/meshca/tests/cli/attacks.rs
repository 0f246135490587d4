//! Identity attacks against the API, each refused (or its trick ignored)
//! and each refusal in the audit log: a workload asking for another
//! identity, wildcards, SANs outside policy, a foreign trust domain, CSR
//! names, hostile characters, look-alike names, revoked and expired
//! certificates renewing, tokens reused, expired or used for another name.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn audit_refusals(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"outcome\":\"refused\""))
        .count()
}

#[test]
fn identity_attacks_are_refused_and_audited() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let web = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    let as_web = cert_args(&web);
    let (csr, _) = openssl_csr(tmp.path(), "web", &[]);
    let attack = |who: &[String], path: &str, body: String, want: &[u16], why: &str| {
        let before = audit_refusals(&d);
        let (code, answer) = srv.curl("POST", path, Some(&body), who);
        assert!(want.contains(&code), "{why}: got {code} {answer}");
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{why}: {answer}"
        );
        // One line per decision: a token's refusal and the request's.
        assert!(audit_refusals(&d) > before, "{why}: not audited");
    };
    let sign = |extra: &str| format!(r#"{{"csr":{csr}{extra}}}"#);

    // Another identity, wildcards, names outside policy, another trust domain.
    attack(
        &as_web,
        "/v1/sign",
        sign(r#","name":"db""#),
        &[403],
        "another identity",
    );
    attack(
        &as_web,
        "/v1/sign",
        sign(r#","name":"web","namespace":"kube-system""#),
        &[403],
        "another namespace",
    );
    attack(
        &as_web,
        "/v1/sign",
        sign(r#","name":"web","dns":["*.default.svc"]"#),
        &[400, 403],
        "a wildcard",
    );
    attack(
        &as_web,
        "/v1/sign",
        sign(r#","name":"web","dns":["evil.example.com"]"#),
        &[403],
        "an extra SAN outside policy",
    );
    attack(
        &as_web,
        "/v1/sign",
        sign(r#","name":"web","ips":["10.0.0.1"]"#),
        &[403],
        "an extra IP outside policy",
    );
    attack(
        &as_web,
        "/v1/sign",
        sign(r#","name":"web","uris":["spiffe://other.domain/ns/default/sa/web"]"#),
        &[400],
        "a URI SAN of another trust domain",
    );
    // Hostile characters and look-alikes, in the name, the namespace and SANs.
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
        attack(
            &as_web,
            "/v1/sign",
            sign(&format!(r#","name":"{name}""#)),
            &[400, 403],
            &format!("name {name:?}"),
        );
    }
    for ns in ["default/..", "..", "default%2F", "kube-system\\n"] {
        attack(
            &as_web,
            "/v1/sign",
            sign(&format!(r#","name":"web","namespace":"{ns}""#)),
            &[400, 403],
            &format!("namespace {ns:?}"),
        );
    }
    for dns in [
        "xn--80ak6aa92e.com",
        "w\u{0435}b.default.svc",
        "web.default.svc\\u0000.evil",
        "a..b",
    ] {
        attack(
            &as_web,
            "/v1/sign",
            sign(&format!(r#","name":"web","dns":["{dns}"]"#)),
            &[400, 403],
            &format!("dns {dns:?}"),
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
    let token = |name: &str, ttl: &str| -> String {
        serde_json::from_str::<Value>(
            &srv.cli_ok(&["token", "create", name, "--ttl", ttl, "--json"]),
        )
        .unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let one = token("api", "1h");
    let (code, answer) = srv.curl(
        "POST",
        "/v1/sign",
        Some(&sign(r#","name":"api""#)),
        &bearer(&one),
    );
    assert_eq!(code, 200, "{answer}");
    attack(
        &bearer(&one),
        "/v1/sign",
        sign(r#","name":"api""#),
        &[401, 403],
        "a token used again",
    );
    let other = token("api2", "1h");
    attack(
        &bearer(&other),
        "/v1/sign",
        sign(r#","name":"db""#),
        &[401, 403],
        "a token for another identity",
    );
    let short = token("api3", "1s");
    std::thread::sleep(Duration::from_millis(2500));
    attack(
        &bearer(&short),
        "/v1/sign",
        sign(r#","name":"api3""#),
        &[401, 403],
        "an expired token",
    );

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
    srv.cli_ok(&["revoke", serial.trim().trim_start_matches("serial=")]);
    attack(
        &as_web,
        "/v1/sign",
        sign(r#","name":"web""#),
        &[401, 403],
        "a revoked certificate renewing",
    );

    // An expired certificate renewing: refused in the handshake or after it.
    let brief = tmp.path().join("brief");
    srv.cli_ok(&[
        "issue",
        "brief",
        "--ttl",
        "1s",
        "--out",
        brief.to_str().unwrap(),
    ]);
    // notAfter has one-second precision and is inclusive: wait past it.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, answer) = srv.curl(
        "POST",
        "/v1/sign",
        Some(&sign(r#","name":"brief""#)),
        &cert_args(&brief),
    );
    assert!(
        code == 0 || code == 401 || code == 403,
        "an expired certificate renewed: {code} {answer}"
    );
}
