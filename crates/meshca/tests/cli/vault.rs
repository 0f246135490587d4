//! The Vault issuer against a real OpenBao (`bao server -dev`, or a
//! raft-storage server where a restart must keep the PKI): meshca decides,
//! Vault signs, openssl checks the result against Vault's own CA.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use meshca_testkit::Bao;
use serde_json::Value;

use crate::common::*;
use crate::crl;

/// `serve` flags for the Vault issuer with a token file: the role
/// `meshca` for the service profile, and the roles `Bao::setup_pki` made
/// for the profiles with one usage.
fn vault_flags(bao: &Bao, token_file: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--issuer",
        "vault",
        "--vault-addr",
        &bao.addr,
        "--vault-role",
        "meshca",
        "--vault-token-file",
        token_file.to_str().unwrap(),
        "--vault-refresh",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.extend(Bao::profile_role_flags("meshca"));
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

fn start(dir: &Path, flags: &[String]) -> Server {
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start(dir, &args)
}

fn root_token_file(bao: &Bao, dir: &Path) -> PathBuf {
    let p = dir.join("vault-token");
    Bao::write_secret(&p, &bao.root_token);
    p
}

fn serial_of(cert: &Path) -> String {
    let s = tool(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-serial"],
    );
    s.trim().trim_start_matches("serial=").to_lowercase()
}

fn colon(serial: &str) -> String {
    serial
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {secs}s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn issue_status(srv: &Server, name: &str) -> (u16, String) {
    srv.curl(
        "POST",
        "/v1/issue",
        Some(&format!(r#"{{"name":"{name}"}}"#)),
        &srv.admin(),
    )
}

/// [`issue_status`] with curl giving up after `secs` (status 0 then).
fn issue_within(srv: &Server, name: &str, secs: u32) -> (u16, String) {
    let mut args = srv.admin();
    args.extend(["--max-time".to_owned(), secs.to_string()]);
    srv.curl(
        "POST",
        "/v1/issue",
        Some(&format!(r#"{{"name":"{name}"}}"#)),
        &args,
    )
}

fn log_of(srv: &Server) -> String {
    std::fs::read_to_string(&srv.log).unwrap_or_default()
}

#[test]
fn vault_signs_what_meshca_decides() {
    let bao = Bao::start_dev();
    bao.setup_pki("pki", "meshca", &[]);
    let tmp = scratch();
    let token = root_token_file(&bao, tmp.path());
    let d = tmp.path().join("data");
    let srv = start(&d, &vault_flags(&bao, &token, &[]));

    // The data directory remembers the issuer and holds no CA key.
    let toml = std::fs::read_to_string(d.join("meshca.toml")).unwrap();
    assert!(
        toml.contains("kind = \"vault\"") && toml.contains(&bao.addr),
        "{toml}"
    );
    assert!(
        !d.join("ca").exists(),
        "a Vault-backed meshca keeps no CA keys"
    );
    let status: Value = serde_json::from_str(&srv.cli_ok(&["ca", "status", "--json"])).unwrap();
    assert_eq!(status["issuer"], "vault", "{status}");
    assert_eq!(status["issuer_health"], "ok", "{status}");
    assert_eq!(status["healthy"], true, "{status}");

    let vault_ca = tmp.path().join("vault-ca.pem");
    std::fs::write(
        &vault_ca,
        bao.run(&["read", "-field=certificate", "pki/cert/ca"]),
    )
    .unwrap();
    let verify = |cert: &Path, ca: &Path| {
        tool(
            "openssl",
            &[
                "verify",
                "-CAfile",
                ca.to_str().unwrap(),
                cert.to_str().unwrap(),
            ],
        )
    };

    // A key generated for the caller (Vault's `issue`), checked by openssl
    // against Vault's CA; meshca's trust bundle is Vault's root.
    let web = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    verify(&web.join("tls.crt"), &vault_ca);
    assert_eq!(
        std::fs::read_to_string(web.join("ca.crt")).unwrap().trim(),
        std::fs::read_to_string(&vault_ca).unwrap().trim()
    );
    assert_eq!(mode(&web.join("tls.key")), 0o600);

    // A CSR (Vault's `sign`) that claims other names: none of them is copied.
    let (csr, key) = openssl_csr(
        tmp.path(),
        "evil",
        &[
            "-addext",
            "subjectAltName=DNS:evil.example.com,URI:spiffe://cluster.local/ns/meshca-system/sa/admin",
        ],
    );
    let (code, body) = srv.curl(
        "POST",
        "/v1/sign",
        Some(&format!(r#"{{"name":"api","csr":{csr}}}"#)),
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let cert = tmp.path().join("api.crt");
    std::fs::write(&cert, v["certificate"].as_str().unwrap()).unwrap();
    verify(&cert, &vault_ca);
    let text = tool(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"],
    );
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/api"),
        "{text}"
    );
    assert!(
        !text.contains("evil.example.com") && !text.contains("meshca-system"),
        "{text}"
    );
    let key_pub = tool(
        "openssl",
        &["pkey", "-in", key.to_str().unwrap(), "-pubout"],
    );
    let cert_pub = tool(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-pubkey"],
    );
    assert_eq!(key_pub, cert_pub, "the certificate certifies the CSR's key");

    // A lifetime above the role's max_ttl is refused by name, not cut.
    let (code, body) = srv.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"long","ttl":"100h"}"#),
        &srv.admin(),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("max_ttl") && body.contains("72h"), "{body}");
    // A request Vault itself refuses comes back with Vault's reason.
    bao.run(&[
        "patch",
        "pki/roles/meshca",
        "allow_any_name=false",
        "allowed_domains=example.org",
    ]);
    let (code, body) = issue_status(&srv, "db");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("Vault refused") && body.contains("not allowed by this role"),
        "{body}"
    );
    bao.run(&["patch", "pki/roles/meshca", "allow_any_name=true"]);
    // A role changed under meshca to copy CSR names: meshca stops signing
    // through it (and says why) until it is safe again.
    bao.run(&["patch", "pki/roles/meshca", "use_csr_sans=true"]);
    wait_for("meshca to refuse the role", 15, || {
        srv.curl("GET", "/readyz", None, &[]).0 == 503
    });
    let (code, body) = issue_status(&srv, "db");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("use_csr_sans"), "{body}");
    bao.run(&["patch", "pki/roles/meshca", "use_csr_sans=false"]);
    wait_for("meshca to accept the role again", 15, || {
        srv.curl("GET", "/readyz", None, &[]).0 == 200
    });
    assert_eq!(issue_status(&srv, "db").0, 200);

    // Revocation is recorded by meshca and sent to Vault, whose CRL meshca serves.
    let serial = serial_of(&web.join("tls.crt"));
    srv.cli_ok(&["revoke", &serial]);
    let vault_view: Value = serde_json::from_str(&bao.run(&[
        "read",
        "-format=json",
        &format!("pki/cert/{}", colon(&serial)),
    ]))
    .unwrap();
    assert!(
        vault_view["data"]["revocation_time"].as_i64().unwrap_or(0) > 0,
        "{vault_view}"
    );
    // Vault's CRL, signed by Vault's CA, revokes web's certificate (Vault's
    // entries carry no reason code) and not api's, of the same CA.
    let crl = crl::fetch(&srv, "/v1/crl", &tmp.path().join("crl.pem"));
    crl::assert_checks(&web.join("tls.crt"), &cert, &vault_ca, &crl, None);

    // The agent works as with the built-in CA.
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "agent1", "--json"])).unwrap();
    let out_dir = tmp.path().join("agent1");
    ok(&[
        "agent",
        "agent1",
        "--server",
        &srv.url(),
        "--token",
        v["token"].as_str().unwrap(),
        "--ca-fingerprint",
        v["ca_fingerprint"].as_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--once",
    ]);
    verify(&out_dir.join("tls.crt"), &vault_ca);
    // The agent's ca.crl (from /v1/crls) says the same, of its own
    // certificate too.
    let agent_crl = out_dir.join("ca.crl");
    crl::assert_revoked(&web.join("tls.crt"), &vault_ca, &agent_crl, None);
    crl::assert_good(&out_dir.join("tls.crt"), &vault_ca, &agent_crl);
    crl::assert_good(&cert, &vault_ca, &agent_crl);

    // A new issuer in the mount is noticed: bundle-changed goes out, the
    // bundle holds both roots, and new leaves chain to the new default.
    bao.run(&[
        "write",
        "pki/root/generate/internal",
        "common_name=meshca test root 2",
        "issuer_name=second",
        "ttl=8760h",
    ]);
    bao.run(&["write", "pki/config/issuers", "default=second"]);
    wait_for("the new root in meshca's bundle", 15, || {
        let (code, body) = srv.curl("GET", "/v1/bundle", None, &[]);
        code == 200 && split_pem(&body).len() == 2
    });
    let events = std::process::Command::new("curl")
        .args(["-sS", "-N", "--max-time", "2", "--cacert"])
        .arg(d.join("admin/ca.crt"))
        .args(srv.admin())
        .args(["-H", "Last-Event-ID: 0"])
        .arg(format!("{}/v1/events", srv.url()))
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("event: bundle-changed"), "{events}");
    // The server keeps a certificate that clients of the old bundle
    // trust, and hands out the new bundle to them.
    let (code, bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(code, 200, "{bundle}");
    std::fs::write(d.join("admin/ca.crt"), &bundle).unwrap();
    let second_ca = tmp.path().join("second-ca.pem");
    std::fs::write(
        &second_ca,
        bao.run(&["read", "-field=certificate", "pki/issuer/second"]),
    )
    .unwrap();
    let after = tmp.path().join("after");
    srv.cli_ok(&["issue", "after", "--out", after.to_str().unwrap()]);
    verify(&after.join("tls.crt"), &second_ca);
}

#[test]
fn a_vault_namespace_is_used_for_every_call() {
    // The PKI lives only in namespace `team-a`; the root namespace has none.
    let bao = Bao::start_dev();
    bao.setup_pki_in(Some("team-a"), "pki", "meshca", &[]);
    let tmp = scratch();
    let token = root_token_file(&bao, tmp.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let without = tmp.path().join("without");
    let mut args = vec![
        "serve",
        "--dir",
        without.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    let flags = vault_flags(&bao, &token, &[]);
    args.extend(flags.iter().map(String::as_str));
    // Without the namespace, meshca looks in the root namespace and says
    // what it did not find there.
    fails(&args, &["\"meshca\"", "does not exist", "\"pki\""]);
    assert!(
        !without.exists(),
        "a refused start must leave nothing behind"
    );

    let d = tmp.path().join("data");
    let srv = start(
        &d,
        &vault_flags(&bao, &token, &["--vault-namespace", "team-a"]),
    );
    let toml = std::fs::read_to_string(d.join("meshca.toml")).unwrap();
    assert!(
        toml.contains("team-a"),
        "the namespace is remembered: {toml}"
    );
    let status: Value = serde_json::from_str(&srv.cli_ok(&["ca", "status", "--json"])).unwrap();
    assert_eq!(status["issuer_health"], "ok", "{status}");
    // Signed by the namespace's CA, checked by openssl.
    let ns_ca = tmp.path().join("team-a-ca.pem");
    std::fs::write(
        &ns_ca,
        bao.run_in(
            Some("team-a"),
            &["read", "-field=certificate", "pki/cert/ca"],
        ),
    )
    .unwrap();
    let web = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            ns_ca.to_str().unwrap(),
            web.join("tls.crt").to_str().unwrap(),
        ],
    );
    // Vault recorded the issuance in that namespace.
    let serial = colon(&serial_of(&web.join("tls.crt")));
    let listed = bao.run_in(Some("team-a"), &["list", "pki/certs"]);
    assert!(listed.contains(&serial), "{serial} not in\n{listed}");
}

#[test]
fn profile_roles_from_the_config_file_pick_the_role() {
    let bao = Bao::start_dev();
    bao.setup_pki("pki", "meshca", &[]);
    // The client profile's own role: client auth only, at most an hour.
    bao.run(&[
        "write",
        "pki/roles/clients",
        "allow_any_name=true",
        "allowed_uri_sans=spiffe://cluster.local/*",
        "use_csr_sans=false",
        "use_csr_common_name=false",
        "server_flag=false",
        "client_flag=true",
        "key_usage=DigitalSignature",
        "key_type=any",
        "max_ttl=1h",
    ]);
    let tmp = scratch();
    let token = root_token_file(&bao, tmp.path());
    let d = tmp.path().join("data");
    drop(start(&d, &vault_flags(&bao, &token, &[])));
    let config = d.join("meshca.toml");
    let written = std::fs::read_to_string(&config).unwrap();
    // The start wrote the profile roles of the flags; the client's changes.
    let given = "client = \"meshca-client\"";
    assert!(written.contains(given), "{written}");
    let with_role = |role: &str| {
        std::fs::write(
            &config,
            written.replace(given, &format!("client = \"{role}\"")),
        )
        .unwrap();
    };
    // A role that does not exist is refused at start, by name.
    with_role("nosuch");
    let listen = format!("127.0.0.1:{}", free_port());
    fails(
        &["serve", "--dir", d.to_str().unwrap(), "--listen", &listen],
        &["\"nosuch\"", "does not exist"],
    );

    with_role("clients");
    let srv = Server::start(&d, &[]);
    let (client, service) = (tmp.path().join("client"), tmp.path().join("service"));
    srv.cli_ok(&[
        "issue",
        "robot",
        "--profile",
        "client",
        "--out",
        client.to_str().unwrap(),
    ]);
    srv.cli_ok(&["issue", "web", "--out", service.to_str().unwrap()]);
    // The client certificate came through `clients` (its max_ttl of an
    // hour; the 5 minutes of backdating on top), the service one through
    // the default role (the service profile's 24 hours).
    let hour = Duration::from_secs(3600);
    assert!(lifetime(&client.join("tls.crt")) <= hour + Duration::from_secs(600));
    assert!(lifetime(&service.join("tls.crt")) > 20 * hour);
    let client_eku = cert_ext(&client.join("tls.crt"), "extendedKeyUsage");
    assert!(
        client_eku.contains("Client Authentication")
            && !client_eku.contains("Server Authentication"),
        "{client_eku}"
    );
}

#[test]
fn unsafe_or_missing_roles_and_bad_logins_are_refused_at_start() {
    let bao = Bao::start_dev();
    bao.setup_pki("pki", "meshca", &[]);
    let tmp = scratch();
    let token = root_token_file(&bao, tmp.path());
    let serve = |dir: &Path, flags: Vec<String>, needles: &[&str]| {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["serve", "--dir", dir.to_str().unwrap(), "--listen", &listen];
        args.extend(flags.iter().map(String::as_str));
        fails(&args, needles);
        assert!(!dir.exists(), "a refused start must leave nothing behind");
    };
    let d = tmp.path().join("data");
    for setting in ["use_csr_sans", "use_csr_common_name"] {
        bao.run(&["patch", "pki/roles/meshca", &format!("{setting}=true")]);
        serve(&d, vault_flags(&bao, &token, &[]), &[setting, "meshca"]);
        bao.run(&["patch", "pki/roles/meshca", &format!("{setting}=false")]);
    }
    bao.run(&[
        "patch",
        "pki/roles/meshca",
        "allowed_uri_sans=spiffe://other.domain/*",
    ]);
    serve(
        &d,
        vault_flags(&bao, &token, &[]),
        &["allowed_uri_sans", "spiffe://cluster.local/*"],
    );
    bao.run(&[
        "patch",
        "pki/roles/meshca",
        "allowed_uri_sans=spiffe://cluster.local/*",
    ]);

    let mut missing = vault_flags(&bao, &token, &[]);
    let at = missing.iter().position(|a| a == "meshca").unwrap();
    missing[at] = "nosuchrole".into();
    serve(&d, missing, &["nosuchrole", "does not exist"]);

    let wrong = tmp.path().join("wrong-token");
    Bao::write_secret(&wrong, "s.not-a-token");
    serve(
        &d,
        vault_flags(&bao, &wrong, &[]),
        &["refused meshca's token", "--vault-token-file"],
    );

    let loose = tmp.path().join("loose-token");
    std::fs::write(&loose, &bao.root_token).unwrap();
    serve(&d, vault_flags(&bao, &loose, &[]), &["loose-token"]);

    let down = format!("http://127.0.0.1:{}", free_port());
    let mut flags = vault_flags(&bao, &token, &["--vault-timeout", "2s"]);
    let at = flags.iter().position(|a| *a == bao.addr).unwrap();
    flags[at] = down;
    serve(&d, flags, &["did not answer", "--vault-addr"]);

    // Something that is not Vault answering at the address.
    let site = tmp.path().join("site");
    std::fs::create_dir_all(site.join("v1/auth/token")).unwrap();
    std::fs::write(site.join("v1/auth/token/lookup-self"), "<html>hello</html>").unwrap();
    let (_http, ports) = start_listening(
        1,
        &tmp.path().join("site.log"),
        |ports| {
            let mut cmd = Command::new("python3");
            cmd.args([
                "-m",
                "http.server",
                &ports[0].to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
                site.to_str().unwrap(),
            ])
            .stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    let port = ports[0];
    let mut flags = vault_flags(&bao, &token, &[]);
    let at = flags.iter().position(|a| *a == bao.addr).unwrap();
    flags[at] = format!("http://127.0.0.1:{port}");
    serve(&d, flags, &["unexpected body", "not JSON"]);

    // A profile whose role lacks the usage it needs is refused by name.
    bao.run(&[
        "write",
        "pki/roles/client-only",
        "allow_any_name=true",
        "allowed_uri_sans=spiffe://cluster.local/*",
        "use_csr_sans=false",
        "use_csr_common_name=false",
        "server_flag=false",
        "key_type=any",
    ]);
    let mut flags = vault_flags(&bao, &token, &[]);
    let at = flags.iter().position(|a| a == "meshca").unwrap();
    flags[at] = "client-only".into();
    serve(&d, flags, &["server_flag=true", "client-only"]);
}

#[test]
fn vault_sealed_hung_stopped_and_back() {
    let bao = Bao::start_persistent();
    bao.setup_pki("pki", "meshca", &[]);
    let tmp = scratch();
    let token = root_token_file(&bao, tmp.path());
    let d = tmp.path().join("data");
    let srv = start(&d, &vault_flags(&bao, &token, &["--vault-timeout", "2s"]));
    let (code, body) = issue_status(&srv, "a");
    assert_eq!(code, 200, "{body}");
    let serial_a = serde_json::from_str::<Value>(&body).unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoke_a = || {
        srv.curl(
            "POST",
            &format!("/v1/certificates/{serial_a}/revoke"),
            None,
            &srv.admin(),
        )
    };
    let ready = || srv.curl("GET", "/readyz", None, &[]);

    // Sealed: a clear 503, /readyz red, the server itself still serves.
    bao.seal();
    let (code, body) = issue_status(&srv, "b");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("sealed"), "{body}");
    let (code, body) = ready();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("sealed"), "{body}");
    assert_eq!(srv.curl("GET", "/healthz", None, &[]).0, 200);
    assert_eq!(srv.curl("GET", "/v1/bundle", None, &[]).0, 200);
    let status: Value = serde_json::from_str(&srv.cli_ok(&["ca", "status", "--json"])).unwrap();
    assert_eq!(status["issuer_health"], "sealed", "{status}");
    let metrics = srv.curl("GET", "/metrics", None, &srv.admin()).1;
    assert!(
        metrics.contains(r#"meshca_issuer_up{issuer="vault",reason="sealed"} 0"#),
        "{metrics}"
    );
    bao.unseal();
    wait_for("readiness after unseal", 15, || ready().0 == 200);
    assert_eq!(issue_status(&srv, "b").0, 200);

    // Hung (the process frozen): the call times out, clearly, and soon:
    // meshca answers (its Vault timeout is 2 s) before curl gives up at
    // 10 s, which would read as status 0.
    bao.pause();
    let (code, body) = issue_within(&srv, "c", 10);
    bao.resume();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("timed out"), "{body}");
    wait_for("readiness after the hang", 15, || ready().0 == 200);

    // Stopped, then restarted (sealed, as a real Vault restarts), unsealed.
    bao.stop();
    let (code, body) = issue_status(&srv, "d");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("unreachable") && body.contains("refused"),
        "{body}"
    );
    wait_for("/readyz to go red", 15, || ready().0 == 503);
    // A revocation while Vault is away is kept by meshca and said to be
    // incomplete; the retry later reaches Vault.
    let (code, body) = revoke_a();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("revoked in meshca") && body.contains("again"),
        "{body}"
    );
    bao.restart();
    wait_for("meshca to see the restarted Vault sealed", 15, || {
        ready().1.contains("sealed")
    });
    bao.unseal();
    wait_for("readiness after the restart", 15, || ready().0 == 200);
    let (code, body) = issue_status(&srv, "d");
    assert_eq!(code, 200, "{body}");
    let (code, body) = revoke_a();
    assert_eq!(code, 200, "{body}");
    let vault_view: Value = serde_json::from_str(&bao.run(&[
        "read",
        "-format=json",
        &format!("pki/cert/{}", colon(&serial_a)),
    ]))
    .unwrap();
    assert!(
        vault_view["data"]["revocation_time"].as_i64().unwrap_or(0) > 0,
        "{vault_view}"
    );
    let log = std::fs::read_to_string(&srv.log).unwrap();
    assert!(
        log.contains("sealed") && log.contains("healthy again"),
        "{log}"
    );
    assert!(
        !log.contains(&bao.root_token),
        "the token must never be logged"
    );
}

#[test]
fn approle_login_token_renewal_and_expiry() {
    let bao = Bao::start_dev();
    bao.setup_pki("pki", "meshca", &[]);
    let tmp = scratch();
    let policy = tmp.path().join("meshca.hcl");
    std::fs::write(
        &policy,
        r#"
path "pki/sign/meshca*" { capabilities = ["update"] }
path "pki/issue/meshca*" { capabilities = ["update"] }
path "pki/revoke" { capabilities = ["update"] }
path "pki/roles/meshca*" { capabilities = ["read"] }
path "pki/issuer/*" { capabilities = ["read"] }
path "pki/issuers" { capabilities = ["list"] }
"#,
    )
    .unwrap();
    bao.run(&["policy", "write", "meshca", policy.to_str().unwrap()]);

    // AppRole: tokens of 3 s, at most 6 s: meshca must renew and log in again.
    bao.run(&["auth", "enable", "approle"]);
    bao.run(&[
        "write",
        "auth/approle/role/meshca",
        "token_policies=meshca",
        "token_ttl=3s",
        "token_max_ttl=6s",
    ]);
    let role_id = bao.run(&["read", "-field=role_id", "auth/approle/role/meshca/role-id"]);
    let secret_id = bao.run(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/meshca/secret-id",
    ]);
    let secret_file = tmp.path().join("secret-id");
    Bao::write_secret(&secret_file, secret_id.trim());
    let d = tmp.path().join("approle");
    let mut flags: Vec<String> = [
        "--issuer",
        "vault",
        "--vault-addr",
        &bao.addr,
        "--vault-role",
        "meshca",
        "--vault-approle-role-id",
        role_id.trim(),
        "--vault-approle-secret-id-file",
        secret_file.to_str().unwrap(),
        "--vault-refresh",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    flags.extend(Bao::profile_role_flags("meshca"));
    let srv = start(&d, &flags);
    // The first token came before the server was ready: it is gone 6 s
    // (its max TTL) from now at the latest, a second more for Vault's
    // whole seconds.
    let first_gone = SystemTime::now() + Duration::from_secs(7);
    let logins = || log_of(&srv).matches("logged in to Vault").count();
    // Issuance never stops working: until meshca has logged in again and
    // the first token is gone, and once more after that.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        let done = logins() >= 2 && SystemTime::now() > first_gone;
        let (code, body) = issue_status(&srv, &format!("w{n}"));
        assert_eq!(code, 200, "issuance {n} with AppRole: {body}");
        n += 1;
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no second login within 60 s: {}",
            log_of(&srv)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(srv.curl("GET", "/readyz", None, &[]).0, 200);
    let log = log_of(&srv);
    assert!(
        !log.contains(secret_id.trim()),
        "the secret id must never be logged"
    );
    drop(srv);

    // A renewable token of 3 s (at most 60 s) outlives its first TTL.
    let renewable = bao.run(&[
        "token",
        "create",
        "-policy=meshca",
        "-ttl=3s",
        "-explicit-max-ttl=60s",
        "-field=token",
    ]);
    // Made just now: its first TTL ends 3 s from now at the latest.
    let first_ttl_end = SystemTime::now() + Duration::from_secs(3);
    let token_file = tmp.path().join("renewable");
    Bao::write_secret(&token_file, renewable.trim());
    let d = tmp.path().join("renewable-dir");
    let srv = start(&d, &vault_flags(&bao, &token_file, &[]));
    // Past twice its TTL: it still works only if meshca renewed it, more
    // than once.
    wait_past(first_ttl_end + Duration::from_secs(3));
    let (code, body) = issue_status(&srv, "late");
    assert_eq!(code, 200, "after the token's first TTL: {body}");
    drop(srv);

    // A token that cannot be renewed expires: a clear 503 naming the token,
    // /readyz red; a new token in the file brings meshca back.
    let short = bao.run(&[
        "token",
        "create",
        "-policy=meshca",
        "-ttl=4s",
        "-renewable=false",
        "-field=token",
    ]);
    // Made just now: it ends 4 s from now at the latest.
    let short_end = SystemTime::now() + Duration::from_secs(4);
    let token_file = tmp.path().join("short");
    Bao::write_secret(&token_file, short.trim());
    let d = tmp.path().join("short-dir");
    let srv = start(&d, &vault_flags(&bao, &token_file, &[]));
    wait_past(short_end);
    let (code, body) = issue_status(&srv, "expired");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("refused meshca's token"), "{body}");
    wait_for("/readyz to go red", 15, || {
        srv.curl("GET", "/readyz", None, &[]).0 == 503
    });
    let fresh = bao.run(&[
        "token",
        "create",
        "-policy=meshca",
        "-ttl=1h",
        "-field=token",
    ]);
    Bao::write_secret(&token_file, fresh.trim());
    wait_for("readiness with the new token", 15, || {
        srv.curl("GET", "/readyz", None, &[]).0 == 200
    });
    assert_eq!(issue_status(&srv, "renewed").0, 200);
}

#[test]
fn https_vault_is_verified_against_the_given_ca() {
    let bao = Bao::start_dev_tls();
    bao.setup_pki("pki", "meshca", &[]);
    let tmp = scratch();
    let token = root_token_file(&bao, tmp.path());
    let ca = bao.ca_file.clone().unwrap();
    // Without the CA, Vault's certificate is not trusted: a clear refusal.
    let listen = format!("127.0.0.1:{}", free_port());
    let d = tmp.path().join("data");
    let flags = vault_flags(&bao, &token, &[]);
    let mut args = vec!["serve", "--dir", d.to_str().unwrap(), "--listen", &listen];
    args.extend(flags.iter().map(String::as_str));
    fails(&args, &["did not answer", "certificate"]);
    // With it, everything works over https.
    let srv = start(
        &d,
        &vault_flags(&bao, &token, &["--vault-ca", ca.to_str().unwrap()]),
    );
    let (code, body) = issue_status(&srv, "web");
    assert_eq!(code, 200, "{body}");
    let toml = std::fs::read_to_string(d.join("meshca.toml")).unwrap();
    assert!(toml.contains("ca_file"), "{toml}");
}
