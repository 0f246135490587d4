//! Trust-model attacks (issue 19): trust_vault. A real OpenBao as an
//! upstream that signs more than meshca decided, or that redirects meshca's
//! calls elsewhere: every certificate is checked against what meshca
//! decided (here: its usages), one that fails is revoked in Vault and never
//! handed out, a role that would add usages is refused before Vault signs,
//! and no redirect is followed.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshca_testkit::Bao;
use serde_json::Value;

use crate::common::*;

fn token_file(bao: &Bao, dir: &Path) -> PathBuf {
    let p = dir.join("vault-token");
    Bao::write_secret(&p, &bao.root_token);
    p
}

/// `serve` flags for the Vault issuer: `role` for the service profile and,
/// with `per_profile`, the roles `Bao::setup_pki` made for the others.
fn vault_flags(
    bao: &Bao,
    token: &Path,
    role: &str,
    per_profile: bool,
    refresh: &str,
) -> Vec<String> {
    let mut v: Vec<String> = [
        "--issuer",
        "vault",
        "--vault-addr",
        &bao.addr,
        "--vault-role",
        role,
        "--vault-token-file",
        token.to_str().unwrap(),
        "--vault-refresh",
        refresh,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if per_profile {
        v.extend(Bao::profile_role_flags(role));
    }
    v
}

fn start(dir: &Path, flags: &[String]) -> Server {
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start(dir, &args)
}

/// `meshca serve` on `dir` with `flags` must fail naming every needle,
/// and leave nothing behind.
fn serve_fails(dir: &Path, flags: &[String], needles: &[&str]) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["serve", "--dir", dir.to_str().unwrap(), "--listen", &listen];
    args.extend(flags.iter().map(String::as_str));
    let stderr = fails(&args, needles);
    assert!(!dir.exists(), "a refused start must leave nothing behind");
    stderr
}

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

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {secs}s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Vault's serial notation, whichever separator a listing uses.
fn norm(serial: &str) -> String {
    serial.trim().to_lowercase().replace('-', ":")
}

fn serials(bao: &Bao, path: &str) -> Vec<String> {
    bao.list_serials(path)
        .iter()
        .map(String::as_str)
        .map(norm)
        .collect()
}

/// The second line of `openssl x509 -ext NAME`: the extension's value.
fn ext_value(cert: &Path, name: &str) -> String {
    let text = cert_ext(cert, name);
    text.lines().nth(1).unwrap_or_default().trim().to_owned()
}

/// With the role the README documented (one role, server_flag and
/// client_flag, Vault's default key_usage), a `server` certificate comes
/// back with clientAuth: it would authenticate to meshca as a client. Such
/// a role is refused at start, by setting, before Vault signs anything; a
/// role changed to add usages under a running meshca gets its certificate
/// refused and revoked in Vault, and is then refused before Vault signs.
#[test]
fn certificates_with_usages_meshca_did_not_ask_for_are_revoked_and_never_handed_out() {
    let bao = Bao::start_dev();
    bao.setup_pki("pki", "meshca", &[]);
    let tmp = scratch();
    let token = token_file(&bao, tmp.path());

    // The documented role, alone.
    bao.run(&[
        "write",
        "pki/roles/documented",
        "allow_any_name=true",
        "allowed_uri_sans=spiffe://cluster.local/*",
        "use_csr_sans=false",
        "use_csr_common_name=false",
        "server_flag=true",
        "client_flag=true",
        "key_type=any",
        "max_ttl=720h",
    ]);
    let signed = serials(&bao, "pki/certs");
    serve_fails(
        &tmp.path().join("documented"),
        &vault_flags(&bao, &token, "documented", false, "1s"),
        &[
            "\"documented\"",
            "key_usage check",
            "KeyAgreement",
            "key_usage=DigitalSignature",
            "ext_key_usage check: the server profile",
            "clientAuth (client_flag=true)",
            "ext_key_usage check: the client profile",
            "serverAuth (server_flag=true)",
            "--vault-profile-role server=ROLE",
        ],
    );
    assert_eq!(
        serials(&bao, "pki/certs"),
        signed,
        "Vault signed for a role meshca refused"
    );

    // A role per set of usages, and a long refresh: the role changed below
    // is not read again before the next issuance.
    let d = tmp.path().join("data");
    let srv = start(&d, &vault_flags(&bao, &token, "meshca", true, "1h"));
    bao.run(&[
        "patch",
        "pki/roles/meshca-server",
        "client_flag=true",
        "code_signing_flag=true",
        "email_protection_flag=true",
    ]);
    let signed = serials(&bao, "pki/certs");
    let (csr, _) = openssl_csr(tmp.path(), "web", &[]);
    let (code, body) = srv.curl(
        "POST",
        "/v1/sign",
        Some(&format!(
            r#"{{"name":"web","profile":"server","csr":{csr}}}"#
        )),
        &srv.admin(),
    );
    assert_eq!(code, 503, "{body}");
    let (ecode, msg) = error_of(&body);
    assert_eq!(ecode, "unavailable", "{body}");
    for needle in [
        "\"meshca-server\"",
        "ext_key_usage check",
        "clientAuth",
        "codeSigning",
        "emailProtection",
        "[\"serverAuth\"]",
        "client_flag=false",
        "code_signing_flag=false",
        "email_protection_flag=false",
        "revoked it in Vault",
    ] {
        assert!(msg.contains(needle), "lacks {needle:?}: {msg}");
    }
    // Vault did sign one certificate: it is named, revoked in Vault, and
    // carries what the changed role added.
    let new: Vec<String> = serials(&bao, "pki/certs")
        .into_iter()
        .filter(|s| !signed.contains(s))
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let serial = &new[0];
    assert!(msg.contains(serial.as_str()), "{serial}: {msg}");
    let revoked = serials(&bao, "pki/certs/revoked");
    assert!(revoked.contains(serial), "{serial} not in {revoked:?}");
    let held: Value =
        serde_json::from_str(&bao.run(&["read", "-format=json", &format!("pki/cert/{serial}")]))
            .unwrap();
    assert!(
        held["data"]["revocation_time"].as_i64().unwrap_or(0) > 0,
        "{held}"
    );
    let refused = tmp.path().join("refused.crt");
    std::fs::write(&refused, held["data"]["certificate"].as_str().unwrap()).unwrap();
    let eku = ext_value(&refused, "extendedKeyUsage");
    for usage in [
        "TLS Web Server Authentication",
        "TLS Web Client Authentication",
        "Code Signing",
        "E-mail Protection",
    ] {
        assert!(eku.contains(usage), "{usage}: {eku}");
    }
    // meshca never recorded it, so never handed it out.
    let (code, records) = srv.curl("GET", "/v1/certificates", None, &srv.admin());
    assert_eq!(code, 200, "{records}");
    assert!(
        !records.to_lowercase().contains(&serial.replace(':', "")),
        "{records}"
    );

    // The refusal made meshca read Vault again (it is red until it has);
    // now it knows the role and refuses before Vault signs.
    wait_for("meshca to read the role again", 15, || {
        srv.curl("GET", "/readyz", None, &[]).0 == 200
    });
    let signed = serials(&bao, "pki/certs");
    let (code, body) = srv.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"web2","profile":"server"}"#),
        &srv.admin(),
    );
    assert_eq!(code, 503, "{body}");
    let (_, msg) = error_of(&body);
    for needle in [
        "\"meshca-server\"",
        "ext_key_usage check: the server profile",
        "clientAuth (client_flag=true)",
        "codeSigning (code_signing_flag=true)",
        "emailProtection (email_protection_flag=true)",
        "--vault-profile-role server=ROLE",
    ] {
        assert!(msg.contains(needle), "lacks {needle:?}: {msg}");
    }
    assert_eq!(
        serials(&bao, "pki/certs"),
        signed,
        "Vault signed for a role meshca knew to be wrong"
    );
    // Other profiles, through their roles, are not held up.
    let (code, body) = srv.curl("POST", "/v1/issue", Some(r#"{"name":"svc"}"#), &srv.admin());
    assert_eq!(code, 200, "{body}");

    // The role fixed: the next issuance reads it again and works at once.
    bao.run(&[
        "patch",
        "pki/roles/meshca-server",
        "client_flag=false",
        "code_signing_flag=false",
        "email_protection_flag=false",
    ]);
    let out = tmp.path().join("fixed");
    srv.cli_ok(&[
        "issue",
        "web3",
        "--profile",
        "server",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        ext_value(&out.join("tls.crt"), "extendedKeyUsage"),
        "TLS Web Server Authentication"
    );
}

/// With a role per set of usages (as the README now documents), every
/// profile gets exactly its usages: meshca's own server and admin
/// certificates included, a CSR that asks for more, an RSA key.
#[test]
fn roles_set_per_profile_give_exactly_the_profiles_usages() {
    let bao = Bao::start_dev();
    bao.setup_pki("pki", "meshca", &[]);
    let tmp = scratch();
    let token = token_file(&bao, tmp.path());
    let d = tmp.path().join("data");
    let srv = start(&d, &vault_flags(&bao, &token, "meshca", true, "1s"));

    let server = "TLS Web Server Authentication";
    let client = "TLS Web Client Authentication";
    let both = format!("{server}, {client}");
    let check = |cert: &Path, eku: &str| {
        assert_eq!(
            ext_value(cert, "extendedKeyUsage"),
            eku,
            "{}",
            cert.display()
        );
        assert_eq!(
            ext_value(cert, "keyUsage"),
            "Digital Signature",
            "{}",
            cert.display()
        );
        assert_eq!(
            ext_value(cert, "basicConstraints"),
            "CA:FALSE",
            "{}",
            cert.display()
        );
    };
    check(&d.join("server/tls.crt"), server);
    check(&d.join("admin/tls.crt"), client);
    for (profile, eku, key_type) in [
        ("service", both.as_str(), "ecdsa-p256"),
        ("server", server, "ecdsa-p256"),
        ("webhook", server, "ed25519"),
        ("client", client, "ecdsa-p384"),
        ("bootstrap", client, "ecdsa-p256"),
        ("server", server, "rsa-2048"),
    ] {
        let out = tmp.path().join(format!("{profile}-{key_type}"));
        srv.cli_ok(&[
            "issue",
            &format!("w-{profile}"),
            "--profile",
            profile,
            "--key-type",
            key_type,
            "--ttl",
            "1h",
            "--out",
            out.to_str().unwrap(),
        ]);
        check(&out.join("tls.crt"), eku);
    }

    // A CSR asking for more usages (and to be a CA) gets the profile's.
    let (csr, _) = openssl_csr(
        tmp.path(),
        "greedy",
        &[
            "-addext",
            "extendedKeyUsage=serverAuth,clientAuth,codeSigning",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=digitalSignature,keyCertSign",
        ],
    );
    let (code, body) = srv.curl(
        "POST",
        "/v1/sign",
        Some(&format!(
            r#"{{"name":"greedy","profile":"server","csr":{csr}}}"#
        )),
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let cert = tmp.path().join("greedy.crt");
    std::fs::write(&cert, v["certificate"].as_str().unwrap()).unwrap();
    check(&cert, server);
    assert_eq!(srv.curl("GET", "/readyz", None, &[]).0, 200);
}

/// An HTTP/1.1 server on a real loopback socket that records every request
/// (head and body) and answers each with `answer(request)`.
struct Http {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Http {
    fn start(answer: impl Fn(&str) -> String + Send + 'static) -> Http {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(request) = read_request(&mut stream) else {
                    continue;
                };
                let reply = answer(&request);
                log.lock().unwrap().push(request);
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Http { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn read_request(stream: &mut TcpStream) -> Option<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).ok()?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn reply(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A "Vault" that answers every call with a 307 to another host, which
/// would answer as Vault does: meshca sends neither its token nor its
/// AppRole secret id there, and says which setting to fix.
#[test]
fn meshca_follows_no_redirect_from_vault() {
    let elsewhere = Http::start(|request| {
        let body = if request.contains("/login") {
            r#"{"auth":{"client_token":"s.elsewhere","lease_duration":0,"renewable":false}}"#
        } else {
            r#"{"data":{"ttl":0,"renewable":false}}"#
        };
        reply("200 OK", "Content-Type: application/json\r\n", body)
    });
    let to = elsewhere.url();
    let vault = Http::start(move |request| {
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        reply(
            "307 Temporary Redirect",
            &format!("Location: {to}{path}\r\n"),
            "",
        )
    });
    let tmp = scratch();
    let token = tmp.path().join("vault-token");
    Bao::write_secret(&token, "s.meant-for-vault-only");
    let vault_url = vault.url();
    let base = |login: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--issuer",
            "vault",
            "--vault-addr",
            vault_url.as_str(),
            "--vault-role",
            "meshca",
            "--vault-timeout",
            "5s",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.extend(login.iter().map(|s| (*s).to_owned()));
        v
    };

    let stderr = serve_fails(
        &tmp.path().join("token"),
        &base(&["--vault-token-file", token.to_str().unwrap()]),
        &[
            "HTTP 307",
            &format!("{}/v1/auth/token/lookup-self", elsewhere.url()),
            "does not follow redirects",
            "--vault-addr",
        ],
    );
    assert!(
        elsewhere.seen().is_empty(),
        "the redirect was followed: {:?}",
        elsewhere.seen()
    );
    assert!(!stderr.contains("meant-for-vault-only"), "{stderr}");
    assert!(
        vault
            .seen()
            .iter()
            .any(|r| r.contains("meant-for-vault-only")),
        "the test's Vault was not asked: {:?}",
        vault.seen()
    );

    // An AppRole login is a POST, which a followed 307 would send again,
    // secret id and all.
    let secret = tmp.path().join("secret-id");
    Bao::write_secret(&secret, "approle-secret-for-vault-only");
    serve_fails(
        &tmp.path().join("approle"),
        &base(&[
            "--vault-approle-role-id",
            "meshca-role-id",
            "--vault-approle-secret-id-file",
            secret.to_str().unwrap(),
        ]),
        &[
            "HTTP 307",
            &format!("{}/v1/auth/approle/login", elsewhere.url()),
            "does not follow redirects",
        ],
    );
    assert!(
        elsewhere.seen().is_empty(),
        "the redirect was followed: {:?}",
        elsewhere.seen()
    );
}
