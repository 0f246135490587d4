//! Trust-model attacks (issue 19) against the real binary: each mounts the
//! attack, then checks the refusal as itself (status, error code and
//! message) and that the server still serves.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::*;
use crate::events::EventStream;
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

/// A P-256 leaf made by openssl under `ca` (certificate and key files): key
/// in `dir/tls.key`, the certificate in `out`, CA:FALSE and the extensions
/// `ext` (one per line), `extra` flags for `openssl x509 -req`.
fn openssl_leaf(
    dir: &Path,
    ca: &(String, String),
    subject: &str,
    ext: &str,
    extra: &[&str],
    out: &Path,
) {
    let (key, csr, extfile) = (
        dir.join("tls.key"),
        dir.join("tls.csr"),
        dir.join("leaf.ext"),
    );
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
            subject,
        ],
    );
    std::fs::write(
        &extfile,
        format!("basicConstraints=critical,CA:FALSE\n{ext}\n"),
    )
    .unwrap();
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        &ca.0,
        "-CAkey",
        &ca.1,
        "-out",
        out.to_str().unwrap(),
        "-days",
        "1",
        "-extfile",
        extfile.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tool("openssl", &args);
}

fn serial_hex(cert: &Path) -> String {
    let s = tool(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-serial"],
    );
    s.trim().trim_start_matches("serial=").to_lowercase()
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
    let leaf = forged.join("leaf.crt");
    openssl_leaf(
        &forged,
        &int,
        "/CN=admin",
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://cluster.local/ns/meshca-system/sa/admin",
        &["-set_serial", &format!("0x{serial}")],
        &leaf,
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
    // A certificate of that CA with a serial this CA never recorded: the
    // same refusal (not a 404 of the store's lookup).
    let unknown = tmp.path().join("unknown");
    std::fs::create_dir_all(&unknown).unwrap();
    let leaf = unknown.join("leaf.crt");
    openssl_leaf(
        &unknown,
        &int,
        "/CN=web",
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://cluster.local/ns/default/sa/web",
        &["-set_serial", "0x7e57ab1e"],
        &leaf,
    );
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(&leaf).unwrap(),
        std::fs::read_to_string(&int.0).unwrap()
    );
    std::fs::write(unknown.join("tls.crt"), chain).unwrap();
    let (code, body) = srv.curl(
        "GET",
        "/v1/identities/default/web",
        None,
        &cert_args(&unknown),
    );
    let (ecode, msg) = error_of(&body);
    assert_eq!((code, ecode.as_str()), (401, "unauthenticated"), "{body}");
    assert!(msg.contains("7e57ab1e was not issued by this CA"), "{body}");
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
    // Up once it (not another process) listens on its port; started again
    // on another one when the port was taken meanwhile.
    let (_impostor, ports) = start_listening(
        1,
        &tmp.path().join("impostor.log"),
        |ports| {
            let mut cmd = Command::new("openssl");
            cmd.args(["s_server", "-quiet", "-accept"])
                .arg(format!("127.0.0.1:{}", ports[0]))
                .arg("-cert")
                .arg(evil.join("tls.crt"))
                .arg("-cert_chain")
                .arg(evil.join("tls.crt"))
                .arg("-key")
                .arg(evil.join("tls.key"))
                .arg("-www")
                .stdin(std::process::Stdio::null());
            cmd
        },
        |_| true,
    );
    let url = format!("https://localhost:{}", ports[0]);

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
        let port = free_port();
        // Guarded: ended with the test, pass or fail (a server that took
        // the rule would go on serving).
        let mut child = spawn_cmd(
            meshca()
                .args(["serve", "--dir", d.to_str().unwrap(), "--listen"])
                .arg(format!("127.0.0.1:{port}"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped()),
        );
        // A server that takes the rule starts serving: stop it and fail.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break Some(st);
            }
            if std::time::Instant::now() > deadline {
                child.end();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "{rule}: served with the rule: {stderr}"
        );
        assert!(stderr.contains("meshca.toml"), "{rule}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{rule}: lacks {n:?}: {stderr}");
        }
    }
}

fn roots_in(file: &Path) -> usize {
    split_pem(&std::fs::read_to_string(file).unwrap_or_default()).len()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// An agent run with `--once` and the flags it was first started with: the
/// restart of a pod.
fn agent_once(srv: &Server, token: &str, fp: &str, out: &Path) -> std::process::Output {
    let o = meshca()
        .args([
            "agent",
            "web",
            "--server",
            &srv.url(),
            "--token",
            token,
            "--ca-fingerprint",
            fp,
            "--out",
            out.to_str().unwrap(),
            "--once",
        ])
        .output()
        .unwrap();
    keep_output("agent-stderr", &o.stderr);
    o
}

/// Property 1: a pin survives a root rotation. Agents restarted with their
/// original flags (pinned to the old root) start after every stage, and a
/// new agent pinned to the retired root bootstraps through the chain of
/// custody, trusting only the new root.
#[test]
fn a_pin_survives_every_stage_of_a_root_rotation() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--uses", "5", "--json"]))
            .unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let old_fp = v["ca_fingerprint"].as_str().unwrap().to_owned();
    let out = tmp.path().join("web");
    let _agent = spawn_cmd(
        meshca()
            .args([
                "agent",
                "web",
                "--server",
                &srv.url(),
                "--token",
                &token,
                "--ca-fingerprint",
                &old_fp,
                "--out",
                out.to_str().unwrap(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(kept_log("agent.log")),
    );
    wait_for("the first certificate", 30, || out.join("tls.key").exists());
    let restart = |stage: &str| {
        let o = agent_once(&srv, &token, &old_fp, &out);
        assert!(
            o.status.success(),
            "after {stage}, the agent restarted with its flags refused to start: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    restart("bootstrap");

    srv.cli_ok(&["ca", "rotate", "prepare"]);
    wait_for("the new bundle", 60, || roots_in(&out.join("ca.crt")) == 2);
    restart("prepare");

    let serial = serial_hex(&out.join("tls.crt"));
    srv.cli_ok(&["ca", "rotate", "activate", "--window", "1s"]);
    wait_for("the renewal under the new root", 60, || {
        serial_hex(&out.join("tls.crt")) != serial
    });
    restart("activate");

    srv.cli_ok(&["ca", "rotate", "retire", "--force"]);
    wait_for("the old root to leave ca.crt", 60, || {
        roots_in(&out.join("ca.crt")) == 1
    });
    let new_root = std::fs::read_to_string(out.join("ca.crt")).unwrap();
    assert!(
        !tool(
            "openssl",
            &[
                "x509",
                "-noout",
                "-fingerprint",
                "-sha256",
                "-in",
                out.join("ca.crt").to_str().unwrap()
            ]
        )
        .replace(':', "")
        .to_lowercase()
        .contains(&old_fp.replace(':', "").to_lowercase()),
        "the old root is still in ca.crt"
    );
    restart("retire");

    // A new agent, pinned to the retired root.
    let fresh = tmp.path().join("fresh");
    let o = agent_once(&srv, &token, &old_fp, &fresh);
    assert!(
        o.status.success(),
        "a new agent pinned to the retired root did not bootstrap: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(fresh.join("ca.crt")).unwrap(),
        new_root,
        "it trusts exactly today's root"
    );
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            fresh.join("ca.crt").to_str().unwrap(),
            "-untrusted",
            fresh.join("tls.crt").to_str().unwrap(),
            fresh.join("tls.crt").to_str().unwrap(),
        ],
    );

    // A second rotation: the pin is now two roots back, and the chain of
    // custody is crossed link by link (through the retired middle root).
    srv.cli_ok(&["ca", "rotate", "prepare"]);
    wait_for("the third root", 60, || roots_in(&out.join("ca.crt")) == 2);
    let serial = serial_hex(&out.join("tls.crt"));
    srv.cli_ok(&["ca", "rotate", "activate", "--window", "1s"]);
    wait_for("the renewal under the third root", 60, || {
        serial_hex(&out.join("tls.crt")) != serial
    });
    srv.cli_ok(&["ca", "rotate", "retire", "--force"]);
    wait_for("the second root to leave ca.crt", 60, || {
        std::fs::read_to_string(out.join("ca.crt")).unwrap() != new_root
            && roots_in(&out.join("ca.crt")) == 1
    });
    restart("a second retire");
    let third = tmp.path().join("third");
    let o = agent_once(&srv, &token, &old_fp, &third);
    assert!(
        o.status.success(),
        "a new agent pinned two roots back did not bootstrap: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(third.join("ca.crt")).unwrap(),
        std::fs::read_to_string(out.join("ca.crt")).unwrap()
    );
}

/// Property 1: a man in the middle serving the real root next to its own
/// (its TLS certificate even carries the CA's SPIFFE ID, under its own
/// root) gets nothing: the agent keeps only the pinned root, and refuses
/// the server in the handshake, before the token is sent. A `ca.crt` on
/// disk holding a foreign root next to the pinned one is re-checked too.
#[test]
fn a_pin_trusts_the_pinned_root_and_nothing_else() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--uses", "2", "--json"]))
            .unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let fp = v["ca_fingerprint"].as_str().unwrap().to_owned();
    let real_root = std::fs::read_to_string(d.join("admin/ca.crt")).unwrap();

    // The attacker's root, and a server certificate under it that claims
    // to be the CA.
    let evil = openssl_root(tmp.path(), "Evil Root");
    let mitm = tmp.path().join("mitm");
    std::fs::create_dir_all(mitm.join("v1")).unwrap();
    let key = mitm.join("tls.key");
    let crt = mitm.join("tls.crt");
    openssl_leaf(
        &mitm,
        &evil,
        "/CN=localhost",
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,URI:spiffe://cluster.local/ns/meshca-system/sa/meshca",
        &["-CAcreateserial"],
        &crt,
    );
    let evil_root = std::fs::read_to_string(&evil.0).unwrap();
    std::fs::write(mitm.join("v1/bundle"), format!("{real_root}{evil_root}")).unwrap();
    // Up once it (not another process) listens on its port; started again
    // on another one when the port was taken meanwhile.
    let (_mitm, ports) = start_listening(
        1,
        &tmp.path().join("mitm.log"),
        |ports| {
            let mut s_server = Command::new("openssl");
            s_server
                .current_dir(&mitm)
                .args(["s_server", "-quiet", "-WWW", "-accept"])
                .arg(format!("127.0.0.1:{}", ports[0]))
                .arg("-cert")
                .arg(&crt)
                .arg("-key")
                .arg(&key)
                .stdin(std::process::Stdio::null());
            s_server
        },
        |_| true,
    );
    let port = ports[0];

    let out = tmp.path().join("web");
    let o = meshca()
        .args([
            "agent",
            "web",
            "--server",
            &format!("https://localhost:{port}"),
            "--token",
            &token,
            "--ca-fingerprint",
            &fp,
            "--out",
            out.to_str().unwrap(),
            "--once",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the agent took the man in the middle");
    // Refused in the handshake (UnknownIssuer: the evil root is not
    // trusted), not after an HTTP exchange that carried the token.
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );
    assert!(!out.join("ca.crt").exists());

    // A ca.crt on disk with the foreign root next to the pinned one: the
    // restarted agent keeps only the pinned root.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("ca.crt"), format!("{real_root}{evil_root}")).unwrap();
    let o = agent_once(&srv, &token, &fp, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ca = std::fs::read_to_string(out.join("ca.crt")).unwrap();
    assert_eq!(
        ca.trim(),
        real_root.trim(),
        "the foreign root survived in ca.crt"
    );
    // The same with a valid certificate already there (the agent reuses it
    // and does not renew): ca.crt is rewritten at start all the same.
    std::fs::write(out.join("ca.crt"), format!("{real_root}{evil_root}")).unwrap();
    let o = agent_once(&srv, &token, &fp, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ca = std::fs::read_to_string(out.join("ca.crt")).unwrap();
    assert_eq!(
        ca.trim(),
        real_root.trim(),
        "the foreign root stayed in ca.crt"
    );
    still_serving(&srv);
}

/// How often the server authenticates an open event stream's caller again
/// (`STREAM_REAUTH` in crates/meshca-server/src/api.rs).
const STREAM_REAUTH: std::time::Duration = std::time::Duration::from_secs(2);

/// Property 5: an open event stream of a revoked certificate is closed
/// (within STREAM_REAUTH of the revocation on this replica), and the
/// certificate renews nothing.
#[test]
fn a_revoked_callers_event_stream_is_closed() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let web = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    // The workload's own stream, from the start of the event log: once it
    // has delivered the workload's own issuance, it is open and its caller
    // authenticated.
    let stream = EventStream::open(&srv, &cert_args(&web), Some(0));
    stream.read_until(std::time::Duration::from_secs(30), |e| {
        e.kind == "issued" && e.data["name"] == "web"
    });
    // Open, it stays open: through two re-authentications of its caller
    // (an absence, so it is watched for a while: 2 x STREAM_REAUTH).
    assert!(
        !stream.ends_within(2 * STREAM_REAUTH),
        "the stream of a valid certificate ended by itself"
    );
    srv.cli_ok(&["revoke", &serial_hex(&web.join("tls.crt"))]);
    let revoked_at = std::time::Instant::now();
    // Closed at the next re-authentication: STREAM_REAUTH, and slack for
    // a loaded machine.
    let limit = STREAM_REAUTH + std::time::Duration::from_secs(5);
    assert!(
        stream.ends_within(limit),
        "the revoked caller's stream was still open {limit:?} after the revocation"
    );
    println!(
        "the revoked caller's stream closed {:?} after the revocation",
        revoked_at.elapsed()
    );
    let (csr, _) = openssl_csr(tmp.path(), "web", &[]);
    let body = format!(r#"{{"csr":{csr},"name":"web"}}"#);
    let (code, answer) = srv.curl("POST", "/v1/sign", Some(&body), &cert_args(&web));
    assert_eq!(code, 401, "{answer}");
    assert!(error_of(&answer).1.contains("is revoked"), "{answer}");
    still_serving(&srv);
}

/// Property 4: rotation safety counts holders. Two pods of one identity;
/// one gets stuck (stops, never renews). Its healthy sibling does not hide
/// it: activation names it, and retire refuses while its certificate of
/// the old root is live, listing identity, serial and expiry.
#[test]
fn rotation_waits_for_every_holder_not_every_identity() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--uses", "2", "--json"]))
            .unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let fp = v["ca_fingerprint"].as_str().unwrap().to_owned();
    let pod = |name: &str| {
        let out = tmp.path().join(name);
        let child = spawn_cmd(
            meshca()
                .args([
                    "agent",
                    "web",
                    "--server",
                    &srv.url(),
                    "--token",
                    &token,
                    "--ca-fingerprint",
                    &fp,
                    "--out",
                    out.to_str().unwrap(),
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(kept_log("agent.log")),
        );
        wait_for("a pod's certificate", 30, || out.join("tls.key").exists());
        (out, child)
    };
    let (healthy, _a) = pod("pod-a");
    let (stuck, mut b) = pod("pod-b");
    let stuck_serial = serial_hex(&stuck.join("tls.crt"));
    let status = || -> Value {
        serde_json::from_str::<Value>(&srv.cli_ok(&["ca", "status", "--json"])).unwrap()["rotation"]
            .clone()
    };
    wait_for("both pods to be known", 10, || {
        status()["agents"]["alive"] == 2
    });
    b.end();

    srv.cli_ok(&["ca", "rotate", "prepare"]);
    wait_for("the healthy pod to take the new bundle", 60, || {
        roots_in(&healthy.join("ca.crt")) == 2
    });
    wait_for("the healthy pod to acknowledge", 30, || {
        status()["agents"]["acknowledged"] == 1
    });
    let r = status();
    assert_eq!(r["agents"]["alive"], 2, "{r}");
    assert_eq!(r["safe_to_continue"], false, "{r}");
    let out = srv.cli(&["ca", "rotate", "activate"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "activated past a stuck pod");
    assert!(
        stderr.contains(&format!("default/web/{stuck_serial}")),
        "{stderr}"
    );

    let serial = serial_hex(&healthy.join("tls.crt"));
    srv.cli_ok(&["ca", "rotate", "activate", "--force", "--window", "1s"]);
    wait_for("the healthy pod to renew", 60, || {
        serial_hex(&healthy.join("tls.crt")) != serial
    });
    // Once SETTLE (5 s) has passed since the renewal, the healthy pod's
    // old certificate no longer counts: only the stuck one remains.
    let mut r = Value::Null;
    wait_for("only the stuck pod to hold the old root", 30, || {
        r = status();
        r["remaining_under_old"] == 1 && r["waiting_for"][0]["serial"] == stuck_serial.as_str()
    });
    assert_eq!(r["remaining_under_old"], 1, "{r}");
    assert_eq!(r["waiting_for"][0]["serial"], stuck_serial.as_str(), "{r}");
    assert_eq!(r["waiting_for"][0]["identity"], "default/web", "{r}");
    let out = srv.cli(&["ca", "rotate", "retire"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "retired under a live certificate");
    for want in [
        "default/web serial",
        stuck_serial.as_str(),
        "expires",
        "meshca revoke",
    ] {
        assert!(stderr.contains(want), "lacks {want:?}: {stderr}");
    }
    // The stuck pod's certificate revoked: nothing holds the old root.
    srv.cli_ok(&["revoke", &stuck_serial]);
    srv.cli_ok(&["ca", "rotate", "retire"]);
    still_serving(&srv);
}

/// Property 5: during a rotation's overlap, a revoked certificate of the
/// old hierarchy is checkable against its own issuer's CRL. `/v1/crls` has
/// one CRL per issuing CA, each signed by it; openssl and GnuTLS both see
/// the old-chain certificate revoked and the new-chain one good.
#[test]
fn each_issuing_ca_has_its_own_crl_during_a_rotation() {
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let old = tmp.path().join("old");
    srv.cli_ok(&["issue", "web", "--out", old.to_str().unwrap()]);
    srv.cli_ok(&["ca", "rotate", "prepare"]);
    srv.cli_ok(&["ca", "rotate", "activate", "--force", "--window", "1s"]);
    let new = tmp.path().join("new");
    srv.cli_ok(&["issue", "api", "--out", new.to_str().unwrap()]);
    srv.cli_ok(&["revoke", &serial_hex(&old.join("tls.crt"))]);
    let (code, crls) = srv.curl("GET", "/v1/crls", None, &[]);
    assert_eq!(code, 200, "{crls}");
    assert_eq!(crls.matches("BEGIN X509 CRL").count(), 2, "{crls}");
    let crl_file = tmp.path().join("crls.pem");
    std::fs::write(&crl_file, &crls).unwrap();
    let (_, bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    let bundle_file = tmp.path().join("bundle.pem");
    std::fs::write(&bundle_file, &bundle).unwrap();
    let openssl = |dir: &Path| {
        Command::new("openssl")
            .args(["verify", "-crl_check", "-CRLfile"])
            .arg(&crl_file)
            .arg("-CAfile")
            .arg(&bundle_file)
            .arg("-untrusted")
            .arg(dir.join("tls.crt"))
            .arg(dir.join("tls.crt"))
            .output()
            .unwrap()
    };
    let o = openssl(&old);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("certificate revoked"), "{text}");
    let o = openssl(&new);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gnutls = |dir: &Path| {
        let o = Command::new("certtool")
            .args(["--verify", "--load-ca-certificate"])
            .arg(&bundle_file)
            .arg("--load-crl")
            .arg(&crl_file)
            .arg("--infile")
            .arg(dir.join("tls.crt"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    let text = gnutls(&old);
    assert!(text.contains("The certificate chain is revoked"), "{text}");
    let text = gnutls(&new);
    assert!(
        text.contains("Chain verification output: Verified"),
        "{text}"
    );
    // The signing CA's CRL alone is still at /v1/crl.
    let (code, one) = srv.curl(
        "GET",
        "/v1/crl",
        None,
        &["-H".into(), "Accept: application/x-pem-file".into()],
    );
    assert_eq!(code, 200);
    assert_eq!(one.matches("BEGIN X509 CRL").count(), 1, "{one}");
    still_serving(&srv);
}

/// Property 12: an `--out` directory others can write (or that belongs to
/// another user) is refused before anything in it is read; a token file
/// others can read is refused; the hook does not inherit MESHCA_TOKEN.
#[test]
fn the_agents_secrets_and_directory_stay_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = scratch();
    let d = tmp.path().join("ca");
    let srv = Server::start(&d, &[]);
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--uses", "3", "--json"]))
            .unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let fp = v["ca_fingerprint"].as_str().unwrap().to_owned();
    let agent = |out: &Path, extra: &[&str], env_token: bool| {
        let mut c = meshca();
        c.args([
            "agent",
            "web",
            "--server",
            &srv.url(),
            "--ca-fingerprint",
            &fp,
            "--out",
        ])
        .arg(out)
        .arg("--once")
        .args(extra);
        if env_token {
            c.env("MESHCA_TOKEN", &token);
        }
        let o = c.output().unwrap();
        keep_output("agent-stderr", &o.stderr);
        o
    };

    let open = tmp.path().join("open");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = agent(&open, &[], true);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a world-writable --out was used");
    assert!(
        stderr.contains("writable by group or others (mode 0777)"),
        "{stderr}"
    );
    assert!(!open.join("tls.key").exists());

    let theirs = tmp.path().join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::process::Command::new("chown")
        .args(["12345", theirs.to_str().unwrap()])
        .status()
        .unwrap();
    let o = agent(&theirs, &[], true);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "another user's --out was used");
    assert!(stderr.contains("belongs to uid 12345"), "{stderr}");

    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = tmp.path().join("web");
    let o = agent(&out, &["--token-file", token_file.to_str().unwrap()], false);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a token file others can read was used");
    assert!(
        stderr.contains("readable by others (mode 0644)"),
        "{stderr}"
    );
    assert!(stderr.contains("chmod 600"), "{stderr}");

    // The hook runs without the token in its environment.
    let seen = tmp.path().join("hook.env");
    let hook = format!("env > {}", seen.display());
    let o = agent(&out, &["--on-rotate", &hook], true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let env = std::fs::read_to_string(&seen).unwrap();
    assert!(
        !env.contains("MESHCA_TOKEN"),
        "the hook inherited the token"
    );
    assert!(!env.contains(&token), "the hook saw the token");
}
