//! `meshca serve` driven by the CLI and curl: every endpoint, every way in,
//! and the ways that must not get in.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;
use crate::crl;
use crate::events::{EventStream, Sse, events_only};
use crate::refusal::{UNKNOWN_CA, curl_alert};

/// Asserts that an answer is the API error `status` with `code`, its
/// message containing `needle`.
#[track_caller]
fn assert_error(answer: (u16, String), status: u16, code: &str, needle: &str) {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    let v = json(&body);
    assert_eq!(v["error"]["code"], code, "{body}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{body}: lacks {needle:?}");
}

/// Writes a JSON certificate answer as a kubernetes.io/tls directory.
fn save(dir: &Path, answer: &Value, key: Option<&Path>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tls.crt"), answer["certificate"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join("ca.crt"), answer["ca_bundle"].as_str().unwrap()).unwrap();
    match (answer["private_key"].as_str(), key) {
        (Some(k), _) => std::fs::write(dir.join("tls.key"), k).unwrap(),
        (None, Some(k)) => {
            std::fs::copy(k, dir.join("tls.key")).unwrap();
        }
        (None, None) => {}
    }
}

#[test]
fn serve_alone_gives_a_working_ca() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    // The redirect listener's port is chosen afresh with every attempt to
    // start (an attempt whose port was taken is started again elsewhere).
    let mut redirect = 0;
    let srv = Server::start_cmd(&d, |port| {
        redirect = free_port();
        let mut cmd = meshca();
        cmd.args(["serve", "--dir", d.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-redirect", &format!("127.0.0.1:{redirect}")])
            .args(["--server-name", "ca.example.com"]);
        cmd
    });
    assert_eq!(mode(&d.join("admin/tls.key")), 0o600);
    let bundle_file = d.join("admin/ca.crt");
    // Public endpoints.
    assert_eq!(srv.curl("GET", "/healthz", None, &[]).0, 200);
    let (code, bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(code, 200);
    assert_eq!(
        bundle.trim(),
        std::fs::read_to_string(d.join("admin/ca.crt"))
            .unwrap()
            .trim()
    );
    let (code, spec) = srv.curl("GET", "/v1/openapi.json", None, &[]);
    assert_eq!(code, 200);
    let spec = json(&spec);
    for path in [
        "/v1/sign",
        "/v1/issue",
        "/v1/certificates",
        "/v1/tokens",
        "/v1/events",
        "/v1/crl",
        "/v1/ca",
        "/v1/ca/rotate/{step}",
    ] {
        assert!(spec["paths"][path].is_object(), "openapi lacks {path}");
    }
    // The server certificate names localhost, 127.0.0.1 and the extra name; TLS 1.3 only.
    let text = cert_ext(&d.join("server/tls.crt"), "subjectAltName");
    assert!(
        text.contains("DNS:localhost")
            && text.contains("IP Address:127.0.0.1")
            && text.contains("DNS:ca.example.com"),
        "{text}"
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--tls-max",
            "1.2",
            "--cacert",
            d.join("admin/ca.crt").to_str().unwrap(),
        ])
        .arg(format!("{}/healthz", srv.url()))
        .output()
        .unwrap();
    // Refused in the handshake by the server's protocol_version alert
    // (curl's 35: the TLS connection could not be made).
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(35), "TLS 1.2: {err}");
    assert!(err.contains("tlsv1 alert protocol version"), "{err}");
    assert_eq!(srv.curl("GET", "/healthz", None, &[]).0, 200);
    // Plain HTTP on the TLS port: a 400 that says why.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:{}/v1/ca", srv.port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_error(
        (code.parse().unwrap(), body.to_owned()),
        400,
        "bad_request",
        "speaks HTTPS only",
    );
    // The redirect listener.
    assert_redirects(&srv, redirect);
    // The CRL, DER and PEM: one CRL, the intermediate's, signed by it;
    // the admin's certificate passes the check against it.
    let from_der = crl::fetch(&srv, "/v1/crl", &tmp.path().join("crl.pem"));
    let (code, pem) = srv.curl(
        "GET",
        "/v1/crl",
        None,
        &["-H".into(), "Accept: application/x-pem-file".into()],
    );
    assert_eq!(code, 200);
    assert_eq!(pem, std::fs::read_to_string(&from_der).unwrap());
    let all = crl::fetch(&srv, "/v1/crls", &tmp.path().join("crls.pem"));
    assert_eq!(pem, std::fs::read_to_string(&all).unwrap());
    crl::assert_good(&d.join("admin/tls.crt"), &bundle_file, &all);
    crl::assert_forgeries_refused(&d.join("admin/tls.crt"), &bundle_file);
    // Admin-only endpoints refuse the anonymous.
    for path in ["/v1/certificates", "/v1/tokens", "/v1/ca"] {
        assert_error(
            srv.curl("GET", path, None, &[]),
            401,
            "unauthenticated",
            "needs the admin client certificate",
        );
    }
}

#[test]
fn admin_cli_tokens_workloads_and_revocation() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);

    // Online CLI with the admin certificate.
    let status = srv.cli_ok(&["ca", "status", "--json"]);
    assert_eq!(json(&status)["issuer"], "builtin");
    let web = tmp.path().join("web");
    srv.cli_ok(&[
        "issue",
        "web",
        "--namespace",
        "shop",
        "--out",
        web.to_str().unwrap(),
    ]);
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            web.join("ca.crt").to_str().unwrap(),
            "-untrusted",
            web.join("tls.crt").to_str().unwrap(),
            web.join("tls.crt").to_str().unwrap(),
        ],
    );
    assert_eq!(mode(&web.join("tls.key")), 0o600);

    // A join token: one certificate for exactly its identity, from a CSR.
    let out = srv.cli(&["token", "create", "cart", "--namespace", "shop"]);
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(token.starts_with("mct_") && !token.contains('\n'));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca fingerprint"));
    let (csr, key) = openssl_csr(
        tmp.path(),
        "cart",
        &[
            "-addext",
            "subjectAltName=DNS:evil.example.com,URI:spiffe://cluster.local/ns/kube-system/sa/admin",
        ],
    );
    let wrong = format!(r#"{{"name":"db","namespace":"shop","csr":{csr}}}"#);
    assert_error(
        srv.curl("POST", "/v1/sign", Some(&wrong), &bearer(&token)),
        403,
        "forbidden",
        "this join token is for shop/cart, not shop/db",
    );
    let body_ok = format!(r#"{{"name":"cart","namespace":"shop","csr":{csr}}}"#);
    let (code, body) = srv.curl("POST", "/v1/sign", Some(&body_ok), &bearer(&token));
    assert_eq!(code, 200, "{body}");
    let answer = json(&body);
    assert!(answer.get("private_key").is_none());
    let cart = tmp.path().join("cart");
    save(&cart, &answer, Some(&key));
    let text = tool(
        "openssl",
        &[
            "x509",
            "-in",
            cart.join("tls.crt").to_str().unwrap(),
            "-noout",
            "-text",
        ],
    );
    assert!(text.contains("URI:spiffe://cluster.local/ns/shop/sa/cart"));
    assert!(
        !text.contains("evil.example.com") && !text.contains("kube-system"),
        "CSR names leaked: {text}"
    );
    // The token is spent; an unknown one is refused the same way (the
    // audit log tells them apart).
    let spent = "the join token is unknown, expired or used up";
    assert_error(
        srv.curl("POST", "/v1/sign", Some(&body_ok), &bearer(&token)),
        401,
        "unauthenticated",
        spent,
    );
    assert_error(
        srv.curl("POST", "/v1/sign", Some(&body_ok), &bearer("mct_00.11")),
        401,
        "unauthenticated",
        spent,
    );
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let refusals: Vec<Value> = audit
        .lines()
        .map(json)
        .filter(|l| l["action"] == "token-use" && l["outcome"] == "refused")
        .collect();
    assert_eq!(
        refusals
            .iter()
            .map(|l| l["reason"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["used_up", "unknown"],
        "{audit}"
    );

    // The workload renews itself with its own certificate, and only itself.
    let (csr2, _) = openssl_csr(tmp.path(), "cart2", &[]);
    let renew = format!(r#"{{"name":"cart","namespace":"shop","csr":{csr2}}}"#);
    let (code, body) = srv.curl("POST", "/v1/sign", Some(&renew), &cert_args(&cart));
    assert_eq!(code, 200, "{body}");
    let other = format!(r#"{{"name":"web","namespace":"shop","csr":{csr2}}}"#);
    assert_error(
        srv.curl("POST", "/v1/sign", Some(&other), &cert_args(&cart)),
        403,
        "forbidden",
        "shop/cart may not obtain a certificate for shop/web",
    );
    assert_error(
        srv.curl(
            "POST",
            "/v1/issue",
            Some(r#"{"name":"cart","namespace":"shop"}"#),
            &cert_args(&cart),
        ),
        403,
        "forbidden",
        "a workload renews with /v1/sign and its own CSR",
    );
    let (code, _) = srv.curl("GET", "/v1/identities/shop/cart", None, &cert_args(&cart));
    assert_eq!(code, 200);
    for path in ["/v1/identities/shop/web", "/v1/certificates"] {
        assert_error(
            srv.curl("GET", path, None, &cert_args(&cart)),
            403,
            "forbidden",
            "workload shop/cart is not the admin",
        );
    }

    // Revoked: its certificate no longer authenticates it, and the CRL
    // revokes it, for keyCompromise: openssl and GnuTLS refuse it against
    // the issuer's CRL (DER from /v1/crl, PEM from /v1/crls) while web's
    // certificate, of the same intermediate, passes against the same CRL.
    let serial = answer["serial"].as_str().unwrap();
    srv.cli_ok(&["revoke", serial, "--reason", "keyCompromise"]);
    assert_error(
        srv.curl("POST", "/v1/sign", Some(&renew), &cert_args(&cart)),
        401,
        "unauthenticated",
        &format!("client certificate {serial} is revoked"),
    );
    let bundle_file = d.join("admin/ca.crt");
    let crl = crl::fetch(&srv, "/v1/crl", &tmp.path().join("crl.pem"));
    crl::assert_checks(
        &cart.join("tls.crt"),
        &web.join("tls.crt"),
        &bundle_file,
        &crl,
        Some("Key Compromise"),
    );
    let crls = crl::fetch(&srv, "/v1/crls", &tmp.path().join("crls.pem"));
    crl::assert_revoked(
        &cart.join("tls.crt"),
        &bundle_file,
        &crls,
        Some("Key Compromise"),
    );
    crl::assert_good(&web.join("tls.crt"), &bundle_file, &crls);
    // A certificate from another CA does not get in: the handshake ends
    // with the server's unknown_ca alert, and the server serves on.
    let stranger = Ca::new(&[]);
    let s_out = stranger.issue("cart", "s", &["--namespace", "shop"]);
    let mut presenting = vec![
        "--cacert".to_owned(),
        bundle_file.to_str().unwrap().to_owned(),
    ];
    presenting.extend(cert_args(&s_out));
    curl_alert(
        &format!("{}/healthz", srv.url()),
        &presenting,
        UNKNOWN_CA,
        "a certificate of another CA",
    );
    assert_eq!(srv.curl("GET", "/healthz", None, &[]).0, 200);
    let (code, body) = srv.curl("GET", "/v1/certificates", None, &srv.admin());
    assert_eq!(code, 200, "{body}");

    // Lookups, rotation and release.
    let (code, body) = srv.curl(
        "GET",
        "/v1/identities?cn=web.shop.svc.cluster.local",
        None,
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        json(&body)["certificate"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        srv.cli_ok(&["rotate", "web", "--namespace", "shop"])
            .contains("1 identity")
    );
    assert!(srv.cli_ok(&["rotate", "--all"]).contains("identities"));
    let (code, body) = srv.curl("DELETE", "/v1/identities/shop/web", None, &srv.admin());
    assert_eq!(code, 200, "{body}");
    assert_error(
        srv.curl("GET", "/v1/identities/shop/web", None, &srv.admin()),
        404,
        "not_found",
        "no live certificate for shop/web",
    );
    let listed = json(&srv.cli_ok(&["list", "--status", "revoked", "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), 2);

    // Metrics and the audit log.
    let (_, metrics) = srv.curl("GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("meshca_issuances_total{outcome=\"issued\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("meshca_expiry_seconds{kind=\"root\"}"));
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok())
    );
    assert!(audit.contains("\"refused\"") && audit.contains("\"revoke\""));
    assert!(
        !audit.contains(token.split('.').nth(1).unwrap()),
        "a token secret is in the audit log"
    );
    assert!(!audit.contains("PRIVATE KEY"));
}

#[test]
fn bad_requests_get_clear_4xx_and_store_nothing() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let admin = srv.admin();
    let count = || {
        json(&srv.cli_ok(&["list", "--json"]))
            .as_array()
            .unwrap()
            .len()
    };
    let before = count();
    let (csr, _) = openssl_csr(tmp.path(), "ok", &[]);
    let (weak, _) = {
        let key = tmp.path().join("weak.key");
        let path = tmp.path().join("weak.csr");
        tool(
            "openssl",
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:1024",
                "-nodes",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                path.to_str().unwrap(),
                "-subj",
                "/CN=x",
            ],
        );
        (
            serde_json::to_string(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            key,
        )
    };
    let broken = {
        let der = tmp.path().join("ok.der");
        tool(
            "openssl",
            &[
                "req",
                "-in",
                tmp.path().join("ok.csr").to_str().unwrap(),
                "-outform",
                "DER",
                "-out",
                der.to_str().unwrap(),
            ],
        );
        let mut bytes = std::fs::read(&der).unwrap();
        let pos = bytes.windows(8).position(|w| w == b"whatever").unwrap();
        bytes[pos] = b'W';
        let pem = tool_stdin(
            "openssl",
            &["req", "-inform", "DER", "-outform", "PEM"],
            &bytes,
        );
        serde_json::to_string(&pem).unwrap()
    };
    let many: Vec<String> = (0..101).map(|i| format!("\"h{i}.example.com\"")).collect();
    let cases: Vec<(String, String, u16, &str)> = vec![
        ("/v1/sign".into(), "{not json".into(), 400, "invalid JSON"),
        (
            "/v1/sign".into(),
            format!(r#"{{"name":"web","csr":{csr},"colour":"red"}}"#),
            400,
            "unknown field `colour`",
        ),
        (
            "/v1/sign".into(),
            format!(r#"{{"name":"web","csr":{broken}}}"#),
            400,
            "signature does not verify",
        ),
        (
            "/v1/sign".into(),
            format!(r#"{{"name":"web","csr":{weak}}}"#),
            400,
            "at least 2048",
        ),
        (
            "/v1/sign".into(),
            r#"{"name":"web","csr":"hello"}"#.into(),
            400,
            "CSR",
        ),
        (
            "/v1/issue".into(),
            r#"{"name":"Web"}"#.into(),
            400,
            "invalid name",
        ),
        (
            "/v1/issue".into(),
            r#"{"name":"web","ttl":"100000h"}"#.into(),
            400,
            "maximum",
        ),
        (
            "/v1/issue".into(),
            r#"{"name":"web","ttl":"soon"}"#.into(),
            400,
            "invalid duration",
        ),
        (
            "/v1/issue".into(),
            r#"{"name":"web","key_type":"dsa"}"#.into(),
            400,
            "unknown key type",
        ),
        (
            "/v1/issue".into(),
            r#"{"name":"web","dns":["a..b"]}"#.into(),
            400,
            "invalid DNS name",
        ),
        (
            "/v1/issue".into(),
            format!(r#"{{"name":"web","dns":[{}]}}"#, many.join(",")),
            400,
            "at most 100",
        ),
    ];
    for (path, body, want, needle) in &cases {
        assert_error(
            srv.curl("POST", path, Some(body), &admin),
            *want,
            "bad_request",
            needle,
        );
    }
    // Bodies over 64 KiB.
    let huge = format!(r#"{{"name":"web","csr":"{}"}}"#, "A".repeat(70_000));
    assert_error(
        srv.curl("POST", "/v1/sign", Some(&huge), &admin),
        413,
        "too_large",
        "request bodies are limited to 65536 bytes",
    );
    // A workload asking for a name outside the (default) policy.
    let token = srv.cli_ok(&["token", "create", "web"]).trim().to_owned();
    assert_error(
        srv.curl(
            "POST",
            "/v1/sign",
            Some(&format!(
                r#"{{"name":"web","csr":{csr},"dns":["web.example.com"]}}"#
            )),
            &bearer(&token),
        ),
        403,
        "policy",
        "DNS name \"web.example.com\" is not allowed for default/web, by the default policy",
    );
    // An expired token: used once past its own expiry time.
    let short = json(&srv.cli_ok(&["token", "create", "db", "--ttl", "1s", "--json"]));
    wait_past(rfc3339(&short["expires_at"]));
    let short = short["token"].as_str().unwrap().to_owned();
    assert_error(
        srv.curl(
            "POST",
            "/v1/sign",
            Some(&format!(r#"{{"name":"db","csr":{csr}}}"#)),
            &bearer(&short),
        ),
        401,
        "unauthenticated",
        "the join token is unknown, expired or used up",
    );
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let last_use = audit
        .lines()
        .rev()
        .map(json)
        .find(|l| l["action"] == "token-use")
        .unwrap();
    assert_eq!(
        (last_use["outcome"].as_str(), last_use["reason"].as_str()),
        (Some("refused"), Some("expired")),
        "{last_use}"
    );
    assert_eq!(count(), before, "a refused request stored a certificate");
    // Still serving.
    assert_eq!(srv.curl("GET", "/healthz", None, &[]).0, 200);
}

fn tool_stdin(program: &str, args: &[&str], input: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut child = spawn_cmd(
        std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped()),
    );
    child.0.stdin.take().unwrap().write_all(input).unwrap();
    let mut out = Vec::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{program} {args:?}: {status}");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn one_use_token_used_twice_at_once_gives_one_certificate() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    for round in 0..5 {
        let token = srv.cli_ok(&["token", "create", "web"]).trim().to_owned();
        let (csr, _) = openssl_csr(tmp.path(), &format!("r{round}"), &[]);
        let body = format!(r#"{{"name":"web","csr":{csr}}}"#);
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| srv.curl("POST", "/v1/sign", Some(&body), &bearer(&token))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (won, lost): (Vec<_>, Vec<_>) = answers.into_iter().partition(|(c, _)| *c == 200);
        assert_eq!(won.len(), 1, "round {round}: {won:?} {lost:?}");
        assert!(
            json(&won[0].1)["certificate"]
                .as_str()
                .is_some_and(|c| c.contains("BEGIN CERTIFICATE")),
            "{won:?}"
        );
        // Each loser was told the token is spent, and was refused for
        // exactly that (the audit log's reason), not for anything else.
        for answer in lost {
            assert_error(
                answer,
                401,
                "unauthenticated",
                "the join token is unknown, expired or used up",
            );
        }
        let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
        let reasons: Vec<String> = audit
            .lines()
            .map(json)
            .filter(|l| l["action"] == "token-use" && l["outcome"] == "refused")
            .map(|l| l["reason"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(reasons, vec!["used_up"; 3 * (round + 1)], "{audit}");
    }
    // One certificate per round, no more.
    let webs = json(&srv.cli_ok(&["list", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "web")
        .count();
    assert_eq!(webs, 5);
}

#[test]
fn events_stream_and_resume() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let admin = srv.admin();
    let issued = |name: &'static str| move |e: &Sse| e.kind == "issued" && e.data["name"] == name;
    // A client with no event yet asks for everything after id 0: whether
    // its stream is open before the issuance or only after, it gets it.
    let first = EventStream::open(&srv, &admin, Some(0));
    srv.cli_ok(&[
        "issue",
        "web",
        "--out",
        tmp.path().join("w1").to_str().unwrap(),
    ]);
    let seen = events_only(first.read_until(Duration::from_secs(30), issued("web")));
    let last_id = seen.last().unwrap().id;
    drop(first);
    // While nobody listens, two more things happen; a client resuming from
    // its last id gets both.
    srv.cli_ok(&[
        "issue",
        "db",
        "--out",
        tmp.path().join("w2").to_str().unwrap(),
    ]);
    srv.cli_ok(&["rotate", "db"]);
    let resumed = EventStream::open(&srv, &admin, Some(last_id));
    let got = events_only(resumed.read_until(Duration::from_secs(30), |e| {
        e.kind == "rotate" && e.data["name"] == "db"
    }));
    assert!(got.iter().any(issued("db")), "{got:?}");
    assert!(
        got.iter()
            .all(|e| e.id > last_id && e.data["name"] != "web"),
        "replayed an event from before the id: {got:?}"
    );
}

#[test]
fn restart_keeps_state() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let mut srv = Server::start(&d, &[]);
    srv.cli_ok(&[
        "issue",
        "web",
        "--out",
        tmp.path().join("w").to_str().unwrap(),
    ]);
    let token = srv
        .cli_ok(&["token", "create", "db", "--uses", "2"])
        .trim()
        .to_owned();
    let (csr, _) = openssl_csr(tmp.path(), "db", &[]);
    let body = format!(r#"{{"name":"db","csr":{csr}}}"#);
    assert_eq!(
        srv.curl("POST", "/v1/sign", Some(&body), &bearer(&token)).0,
        200
    );
    let before = srv.cli_ok(&["list", "--json"]);
    let port = srv.port;
    srv.kill();
    let srv = Server::start_on(&d, port, &[]);
    assert_eq!(
        json(&srv.cli_ok(&["list", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        json(&before).as_array().unwrap().len()
    );
    // One use left, then none.
    assert_eq!(
        srv.curl("POST", "/v1/sign", Some(&body), &bearer(&token)).0,
        200
    );
    assert_error(
        srv.curl("POST", "/v1/sign", Some(&body), &bearer(&token)),
        401,
        "unauthenticated",
        "the join token is unknown, expired or used up",
    );
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let last_use = audit
        .lines()
        .rev()
        .map(json)
        .find(|l| l["action"] == "token-use")
        .unwrap();
    assert_eq!(
        (last_use["outcome"].as_str(), last_use["reason"].as_str()),
        (Some("refused"), Some("used_up")),
        "{last_use}"
    );
}

#[test]
fn policy_rules_from_the_config_file() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    ok(&["init", "--dir", d.to_str().unwrap()]);
    let mut cfg = std::fs::read_to_string(d.join("meshca.toml")).unwrap();
    cfg.push_str(
        "\n[[policy]]\nnamespace = \"shop\"\ndns = [\"*.shop.example.com\"]\nmax_ttl = \"48h\"\n",
    );
    std::fs::write(d.join("meshca.toml"), cfg).unwrap();
    let srv = Server::start(&d, &[]);
    let (csr, _) = openssl_csr(tmp.path(), "p", &[]);
    let t1 = srv
        .cli_ok(&["token", "create", "web", "-n", "shop", "--uses", "5"])
        .trim()
        .to_owned();
    let ask = |extra: &str| {
        srv.curl(
            "POST",
            "/v1/sign",
            Some(&format!(
                r#"{{"name":"web","namespace":"shop","csr":{csr}{extra}}}"#
            )),
            &bearer(&t1),
        )
    };
    assert_eq!(ask(r#","dns":["api.shop.example.com"]"#).0, 200);
    assert_error(
        ask(r#","dns":["api.bank.example.com"]"#),
        403,
        "policy",
        "policy rule #1",
    );
    let (code, body) = ask(r#","ttl":"72h""#);
    assert_error((code, body.clone()), 403, "policy", "policy rule #1");
    assert!(body.contains("48h"), "{body}");
}

#[test]
fn records_of_certificates_expired_longer_than_keep_expired_are_deleted() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    ok(&["init", "--dir", d.to_str().unwrap()]);
    let toml = d.join("meshca.toml");
    let cfg = std::fs::read_to_string(&toml).unwrap();
    // A bad value is refused at start, naming the file and the field.
    std::fs::write(&toml, format!("keep_expired = \"a week\"\n{cfg}")).unwrap();
    let out = run(&[
        "serve",
        "--dir",
        d.to_str().unwrap(),
        "--listen",
        "127.0.0.1:1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains("meshca.toml: line 1, keep_expired: invalid duration \"a week\""),
        "{err}"
    );
    std::fs::write(&toml, format!("keep_expired = \"1s\"\n{cfg}")).unwrap();
    let mut srv = Server::start(&d, &[]);
    let serial_of = |body: &str| json(body)["serial"].as_str().unwrap().to_owned();
    let (code, body) = srv.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"brief","ttl":"1s"}"#),
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
    let brief = serial_of(&body);
    let brief_not_after = rfc3339(&json(&body)["not_after"]);
    let (code, body) = srv.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"lasting"}"#),
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
    let lasting = serial_of(&body);
    // Expired for longer than keep_expired (1 s): the leader deletes it
    // when it starts and every ten minutes after.
    wait_past(brief_not_after + Duration::from_secs(1));
    srv.kill();
    let srv = Server::start(&d, &[]);
    eventually(
        "the expired record to be deleted",
        Duration::from_secs(20),
        || {
            let (code, _) = srv.curl(
                "GET",
                &format!("/v1/certificates/{brief}"),
                None,
                &srv.admin(),
            );
            code == 404
        },
    );
    let (code, body) = srv.curl(
        "GET",
        &format!("/v1/certificates/{lasting}"),
        None,
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let lines: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("prune-expired"))
        .collect();
    assert!(
        lines.len() == 1 && lines[0].contains("deleted 1 certificate record(s)"),
        "{audit}"
    );
}

/// The store's disk refuses to grow (as when it is full: `ulimit -f`, the
/// signal ignored): an issuance is answered 503 with the reason, nothing of
/// it is recorded, the server keeps serving, and issues again once the
/// disk takes writes.
#[test]
fn a_store_that_cannot_write_refuses_issuance_and_keeps_serving() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let mut srv = Server::start(&d, &[]);
    let body = r#"{"name":"web"}"#;
    assert_eq!(
        srv.curl("POST", "/v1/issue", Some(body), &srv.admin()).0,
        200
    );
    srv.kill();
    // Opened and closed once offline: the journal is checkpointed and removed,
    // so the next server has to make its journal anew.
    let before = json(&ok(&["--dir", d.to_str().unwrap(), "list", "--json"]));
    assert!(!d.join("store.redb.journal-0").exists());
    // No file may grow past 512 KiB: the store (under 100 KiB) and the audit
    // log still take writes, the journal's first 1 MiB of space does not.
    let mut srv = Server::start_under(&d, "trap '' XFSZ; ulimit -f 512");
    assert_error(
        srv.curl("POST", "/v1/issue", Some(body), &srv.admin()),
        503,
        "unavailable",
        "journal could not be written",
    );
    // Still serving: health, the bundle, the listing without the refused one.
    assert_eq!(srv.curl("GET", "/healthz", None, &[]).0, 200);
    assert_eq!(srv.curl("GET", "/v1/bundle", None, &[]).0, 200);
    assert_eq!(json(&srv.cli_ok(&["list", "--json"])), before);
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let last = audit.lines().last().unwrap();
    assert!(
        last.contains("\"refused\"") && last.contains("journal"),
        "{last}"
    );
    srv.kill();
    let srv = Server::start(&d, &[]);
    assert_eq!(
        srv.curl("POST", "/v1/issue", Some(body), &srv.admin()).0,
        200
    );
    let after = json(&srv.cli_ok(&["list", "--json"]));
    assert_eq!(
        after.as_array().unwrap().len(),
        before.as_array().unwrap().len() + 1
    );
}
