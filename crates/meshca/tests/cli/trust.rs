//! Trust-model attacks (issue 19) against the real binary: each mounts the
//! attack, then checks the refusal as itself (status, error code and
//! message) and that the server still serves.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::Value;

use crate::common::*;
use crate::import::{openssl_intermediate, openssl_root};

fn error_of(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    (
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn still_serving(srv: &Server) {
    let (code, body) = srv.curl("GET", "/v1/ca", None, &srv.admin());
    assert_eq!(code, 200, "the server stopped serving: {body}");
}

fn serial_hex(cert: &Path) -> String {
    let s = tool(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-serial"],
    );
    s.trim().trim_start_matches("serial=").to_owned()
}

/// Property 2: with an imported root, another CA of the organisation under
/// that root mints a client certificate with the admin's serial and SPIFFE
/// ID. It is not the admin: the whole certificate must be the one meshca
/// recorded.
#[test]
fn a_certificate_with_the_admins_serial_from_another_ca_under_the_root_is_refused() {
    let tmp = scratch();
    let root = openssl_root(tmp.path(), "Corp Root");
    let d = tmp.path().join("ca");
    ok(&[
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--import-root",
        &root.0,
        "--import-key",
        &root.1,
    ]);
    let srv = Server::start(&d, &[]);
    // The organisation's other issuing CA under the same root.
    let int = openssl_intermediate(tmp.path(), &root);
    let serial = serial_hex(&d.join("admin/tls.crt"));
    let forged = tmp.path().join("forged");
    std::fs::create_dir_all(&forged).unwrap();
    let key = forged.join("tls.key");
    let csr = forged.join("tls.csr");
    let leaf = forged.join("leaf.crt");
    tool(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            "/CN=admin",
        ],
    );
    let ext = forged.join("leaf.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://cluster.local/ns/meshca-system/sa/admin\n",
    )
    .unwrap();
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            &int.0,
            "-CAkey",
            &int.1,
            "-set_serial",
            &format!("0x{serial}"),
            "-out",
            leaf.to_str().unwrap(),
            "-days",
            "1",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
    assert_eq!(
        serial_hex(&leaf),
        serial,
        "the forgery has the admin's serial"
    );
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(&leaf).unwrap(),
        std::fs::read_to_string(&int.0).unwrap()
    );
    std::fs::write(forged.join("tls.crt"), chain).unwrap();

    // The TLS layer accepts it (it chains to the bundle's root); the API
    // does not take it for the admin, nor for anyone.
    let (code, body) = srv.curl("GET", "/v1/certificates", None, &cert_args(&forged));
    let (ecode, msg) = error_of(&body);
    assert_eq!(code, 401, "the forged admin certificate got {code}: {body}");
    assert_eq!(ecode, "unauthenticated", "{body}");
    assert!(msg.contains("was not issued by this CA"), "{body}");
    let (code, body) = srv.curl(
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"web"}"#),
        &cert_args(&forged),
    );
    assert_eq!(code, 401, "the forgery minted a token: {body}");
    still_serving(&srv);
    let log = std::fs::read_to_string(&srv.log).unwrap();
    assert!(log.contains("whose contents do not"), "not logged: {log}");
}

/// Property 3: `meshca-system` is reserved, and the short DNS names that
/// could mean another host or identity are gone.
#[test]
fn the_reserved_namespace_and_short_names_cannot_be_obtained() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    std::fs::create_dir_all(&d).unwrap();
    ok(&["init", "--dir", d.to_str().unwrap()]);
    let mut cfg = std::fs::read_to_string(d.join("meshca.toml")).unwrap();
    cfg.push_str("\n[[policy]]\nnamespace = \"default\"\ndns = [\"localhost\", \"*.other.svc\"]\n");
    std::fs::write(d.join("meshca.toml"), cfg).unwrap();
    let srv = Server::start(&d, &[]);

    // No join token for the CA's or the admin's identity.
    for name in ["admin", "meshca"] {
        let body = format!(r#"{{"name":"{name}","namespace":"meshca-system"}}"#);
        let (code, answer) = srv.curl("POST", "/v1/tokens", Some(&body), &srv.admin());
        let (ecode, msg) = error_of(&answer);
        assert_eq!(code, 400, "a token for meshca-system/{name}: {answer}");
        assert_eq!(ecode, "bad_request", "{answer}");
        assert!(msg.contains("reserved"), "{answer}");
    }
    let out = srv.cli(&["token", "create", "admin", "--namespace", "meshca-system"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reserved"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A workload's certificate names exactly its identity.
    let web = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    let sans = cert_ext(&web.join("tls.crt"), "subjectAltName");
    assert!(
        sans.contains("DNS:web.default.svc, DNS:web.default.svc.cluster.local"),
        "{sans}"
    );
    assert!(!sans.contains("DNS:web,"), "a bare name: {sans}");
    assert!(!sans.contains("DNS:web.default,"), "a short name: {sans}");

    // Not even a policy rule gives a workload `localhost` or another
    // identity's `.svc` name.
    let (csr, _) = openssl_csr(tmp.path(), "web", &[]);
    for (dns, why) in [
        ("localhost", "localhost names"),
        ("db.other.svc", "belong to that meshca identity"),
    ] {
        let body = format!(r#"{{"csr":{csr},"name":"web","dns":["{dns}"]}}"#);
        let (code, answer) = srv.curl("POST", "/v1/sign", Some(&body), &cert_args(&web));
        let (ecode, msg) = error_of(&answer);
        assert_eq!(code, 403, "{dns}: {answer}");
        assert_eq!(ecode, "policy", "{answer}");
        assert!(msg.contains(why), "{dns}: {answer}");
    }
    // The admin, and the reserved namespace through a workload's renewal.
    let body = format!(r#"{{"csr":{csr},"name":"meshca","namespace":"meshca-system"}}"#);
    let (code, answer) = srv.curl("POST", "/v1/sign", Some(&body), &cert_args(&web));
    assert_eq!(code, 403, "{answer}");
    still_serving(&srv);
}

/// Property 3: meshca's clients take a server for the CA only when it holds
/// the CA's SPIFFE ID. A workload that the admin gave `localhost` (allowed:
/// the admin may) serves TLS on loopback with a certificate of the CA's own
/// bundle: the CLI and the agent refuse it before sending anything.
#[test]
fn clients_refuse_a_server_that_is_not_the_ca() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let evil = tmp.path().join("evil");
    srv.cli_ok(&[
        "issue",
        "evil",
        "--profile",
        "server",
        "--dns",
        "localhost",
        "--out",
        evil.to_str().unwrap(),
    ]);
    let port = free_port();
    let _impostor = spawn(
        "openssl",
        &[
            "s_server",
            "-quiet",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            evil.join("tls.crt").to_str().unwrap(),
            "-cert_chain",
            evil.join("tls.crt").to_str().unwrap(),
            "-key",
            evil.join("tls.key").to_str().unwrap(),
            "-www",
        ],
    );
    wait_for_port(port);
    let url = format!("https://localhost:{port}");

    let out = meshca()
        .args([
            "--server",
            &url,
            "--dir",
            d.to_str().unwrap(),
            "ca",
            "status",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the CLI took the impostor for the CA"
    );
    assert!(stderr.contains("is not the meshca CA"), "{stderr}");
    assert!(
        stderr.contains("spiffe://cluster.local/ns/default/sa/evil"),
        "{stderr}"
    );

    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--json"])).unwrap();
    let token = v["token"].as_str().unwrap();
    let out_dir = tmp.path().join("web");
    let out = meshca()
        .args([
            "agent",
            "web",
            "--server",
            &url,
            "--token",
            token,
            "--ca",
            d.join("admin/ca.crt").to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--once",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent took the impostor for the CA"
    );
    assert!(stderr.contains("is not the meshca CA"), "{stderr}");
    assert!(!out_dir.join("tls.crt").exists());
    // The real CA is still the CA for both.
    srv.cli_ok(&["ca", "status"]);
}

/// Property 6: a join token or a workload gets at most its profile's
/// default lifetime unless a policy rule allows more.
#[test]
fn lifetimes_are_bounded_by_the_profile_default() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--json"])).unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let (csr, _) = openssl_csr(tmp.path(), "web", &[]);
    let body = format!(r#"{{"csr":{csr},"name":"web","ttl":"87600h"}}"#);
    let (code, answer) = srv.curl("POST", "/v1/sign", Some(&body), &bearer(&token));
    let (ecode, msg) = error_of(&answer);
    assert_eq!(code, 403, "a token bought a 10-year certificate: {answer}");
    assert_eq!(ecode, "policy", "{answer}");
    assert!(msg.contains("default of 24h"), "{answer}");
    assert!(msg.contains("max_ttl"), "{answer}");
    // The token was refunded: the default lifetime still works with it.
    let body = format!(r#"{{"csr":{csr},"name":"web"}}"#);
    let (code, answer) = srv.curl("POST", "/v1/sign", Some(&body), &bearer(&token));
    assert_eq!(code, 200, "{answer}");

    // A workload renewing itself, the same.
    let web = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    let body = format!(r#"{{"csr":{csr},"name":"web","ttl":"25h"}}"#);
    let (code, answer) = srv.curl("POST", "/v1/sign", Some(&body), &cert_args(&web));
    assert_eq!(code, 403, "{answer}");
    // The admin is bound only by max_ttl.
    let long = tmp.path().join("long");
    srv.cli_ok(&[
        "issue",
        "long",
        "--ttl",
        "48h",
        "--out",
        long.to_str().unwrap(),
    ]);
    still_serving(&srv);
}

/// Property 7: policy rules that can never match are refused at load,
/// naming the rule.
#[test]
fn rules_that_can_never_match_are_refused() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    ok(&["init", "--dir", d.to_str().unwrap()]);
    let base = std::fs::read_to_string(d.join("meshca.toml")).unwrap();
    for (rule, needles) in [
        (
            "namespace = \"*\"\nname = \"web\"",
            &["policy rule #1", "never matches", "drop `name`"][..],
        ),
        (
            "namespace = \"shop\"\ndns = [\"*.Example.com\"]",
            &["policy rule #1", "never matches", "\"*.example.com\""][..],
        ),
        (
            "namespace = \"shop\"\ndns = [\"a*.example.com\"]",
            &["policy rule #1", "never matches", "whole first label"][..],
        ),
        (
            "namespace = \"Shop\"",
            &["policy rule #1", "never matches"][..],
        ),
        (
            "namespace = \"meshca-system\"",
            &["policy rule #1", "reserved"][..],
        ),
    ] {
        std::fs::write(
            d.join("meshca.toml"),
            format!("{base}\n[[policy]]\n{rule}\n"),
        )
        .unwrap();
        let port = free_port().to_string();
        let out = meshca()
            .args([
                "serve",
                "--dir",
                d.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{rule}: served");
        assert!(stderr.contains("meshca.toml"), "{rule}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{rule}: lacks {n:?}: {stderr}");
        }
    }
}
