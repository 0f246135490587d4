//! Trust-model attacks (issue 19): trust_etcd. Write access to etcd is not
//! the CA's key. Someone who can write to the CA's etcd (but holds no seal
//! key) adds a join token of their own, re-targets a workload's certificate
//! record at the admin identity, and adds a hierarchy with their own root,
//! all with `etcdctl put` in the format of the records meshca wrote. The
//! server refuses each record (its log names the key) and keeps serving.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use meshca_testkit::EtcdCluster;
use serde_json::Value;

use crate::common::*;

const PREFIX: &str = "/trust-etcd/";

fn etcdctl(cluster: &EtcdCluster, args: &[&str]) -> Vec<u8> {
    let out = cluster.etcdctl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "etcdctl {}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A value as etcd holds it.
fn get(cluster: &EtcdCluster, key: &str) -> String {
    let mut out = etcdctl(cluster, &["get", "--print-value-only", key]);
    if out.last() == Some(&b'\n') {
        out.pop();
    }
    assert!(!out.is_empty(), "{key} is not in etcd");
    String::from_utf8(out).unwrap()
}

fn put(cluster: &EtcdCluster, key: &str, value: &str) {
    etcdctl(cluster, &["put", key, value]);
}

/// A stored record split into what precedes its JSON (whatever meshca
/// puts there) and the JSON itself, which the attacker edits.
fn split_record(stored: &str) -> (String, Value) {
    let brace = stored.find('{').unwrap();
    (
        stored[..brace].to_owned(),
        serde_json::from_str(&stored[brace..]).unwrap(),
    )
}

fn log_names(server: &Server, key: &str) -> bool {
    let log = std::fs::read(&server.log).unwrap_or_default();
    String::from_utf8_lossy(&log)
        .lines()
        .any(|l| l.contains(key) && l.contains("integrity check"))
}

/// The server's log names `key` as a refused record (within 5 s).
fn wait_logged(server: &Server, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log_names(server, key) {
        assert!(
            Instant::now() < deadline,
            "the server's log does not name the refused record {key}:\n{}",
            String::from_utf8_lossy(&std::fs::read(&server.log).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn healthy(server: &Server) {
    assert_eq!(
        server.curl("GET", "/healthz", None, &[]).0,
        200,
        "the server keeps serving"
    );
}

fn write_pair(dir: &Path, body: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tls.crt"), body["certificate"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join("tls.key"), body["private_key"].as_str().unwrap()).unwrap();
}

#[test]
fn records_written_into_etcd_by_someone_else_grant_nothing() {
    let cluster = EtcdCluster::start(1);
    let tmp = scratch();
    let url = cluster.store_url(PREFIX);
    let seal = tmp.path().join("secrets/seal.key");
    let dir = tmp.path().join("ca");
    ok(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--store",
        &url,
        "--seal-key-file",
        seal.to_str().unwrap(),
    ]);
    let server = Server::start(&dir, &[]);
    let issue_web = r#"{"name":"web","namespace":"shop"}"#;

    // 1. Join tokens. A real one, made through the API, shows the format.
    let real = server
        .cli_ok(&["token", "create", "web", "--namespace", "shop"])
        .trim()
        .to_owned();
    let real_id = real
        .strip_prefix("mct_")
        .and_then(|t| t.split_once('.'))
        .unwrap()
        .0
        .to_owned();
    let (envelope, mut rec) = split_record(&get(&cluster, &format!("{PREFIX}tokens/{real_id}")));
    // The attacker's own token for shop/web: an id and a secret of their
    // choosing, 100 uses. Once without anything before the JSON, once with
    // what preceded the real record's JSON (its MAC, copied).
    let secret = "5e".repeat(32);
    let mut forged = Vec::new();
    for (id, prefix) in [
        ("a77ac4e2a77ac4e2", String::new()),
        ("b88bd5f3b88bd5f3", envelope),
    ] {
        rec["id"] = id.into();
        rec["secret_sha256"] = meshca_pki::fingerprint(secret.as_bytes()).into();
        rec["uses_allowed"] = 100.into();
        rec["uses"] = 0.into();
        let key = format!("{PREFIX}tokens/{id}");
        put(&cluster, &key, &format!("{prefix}{rec}"));
        let token = format!("mct_{id}.{secret}");
        keep_secret("token", token.as_bytes());
        forged.push((key, token));
    }
    for (key, token) in &forged {
        let (code, body) = server.curl("POST", "/v1/issue", Some(issue_web), &bearer(token));
        assert_ne!(
            code, 200,
            "a token written into etcd by someone else bought a certificate for shop/web: {body}"
        );
        assert!(!body.contains("BEGIN CERTIFICATE"), "{body}");
        wait_logged(&server, key);
    }
    healthy(&server);
    // The real token still buys its certificate.
    let (code, body) = server.curl("POST", "/v1/issue", Some(issue_web), &bearer(&real));
    assert_eq!(code, 200, "{body}");
    let listed: Value = serde_json::from_str(&server.cli_ok(&["list", "--json"])).unwrap();
    let web = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["namespace"] == "shop" && r["name"] == "web")
        .count();
    assert_eq!(web, 1, "only the real token's certificate: {listed}");

    // 2. A workload's certificate record re-targeted at the admin identity
    // (its fingerprint and SPIFFE ID kept, so that they still match the
    // certificate the workload presents), before it was ever used.
    let (code, body) = server.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"db","namespace":"shop"}"#),
        &server.admin(),
    );
    assert_eq!(code, 200, "{body}");
    let issued: Value = serde_json::from_str(&body).unwrap();
    let workload = tmp.path().join("db");
    write_pair(&workload, &issued);
    let cert_key = format!("{PREFIX}certs/{}", issued["serial"].as_str().unwrap());
    let (envelope, mut rec) = split_record(&get(&cluster, &cert_key));
    rec["namespace"] = "meshca-system".into();
    rec["name"] = "admin".into();
    put(&cluster, &cert_key, &format!("{envelope}{rec}"));
    for (method, path) in [("GET", "/v1/certificates"), ("GET", "/v1/tokens")] {
        let (code, body) = server.curl(method, path, None, &cert_args(&workload));
        assert_ne!(
            code, 200,
            "a certificate record rewritten in etcd made shop/db the admin ({path}): {body}"
        );
    }
    wait_logged(&server, &cert_key);
    healthy(&server);
    let (code, body) = server.curl("GET", "/v1/certificates", None, &server.admin());
    assert_eq!(code, 200, "{body}");

    // 3. A hierarchy added with the attacker's root, in the bundle
    // (status retiring), seen by a restarted server.
    let keys = String::from_utf8(etcdctl(
        &cluster,
        &[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}hierarchies/"),
        ],
    ))
    .unwrap();
    let real_key = keys
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap()
        .to_owned();
    let (envelope, mut rec) = split_record(&get(&cluster, &real_key));
    let attacker = tmp.path().join("attacker");
    std::fs::create_dir_all(&attacker).unwrap();
    let (root, key) = (attacker.join("root.crt"), attacker.join("root.key"));
    tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            root.to_str().unwrap(),
            "-subj",
            "/CN=not meshca",
            "-days",
            "30",
        ],
    );
    let root_pem = std::fs::read_to_string(&root).unwrap();
    rec["id"] = "attacker".into();
    rec["status"] = "retiring".into();
    rec["root_pem"] = root_pem.clone().into();
    let forged_key = format!("{PREFIX}hierarchies/attacker");
    put(&cluster, &forged_key, &format!("{envelope}{rec}"));
    drop(server);
    let server = Server::start(&dir, &[]);
    let (code, bundle) = server.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(code, 200, "{bundle}");
    let body_line = root_pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() > 40)
        .unwrap();
    assert!(
        !bundle.contains(body_line),
        "a hierarchy written into etcd by someone else put its root in the trust bundle:\n{bundle}"
    );
    wait_logged(&server, &forged_key);
    healthy(&server);
    // The restarted server still issues, and still refuses the forgeries.
    let (code, body) = server.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"after","namespace":"shop"}"#),
        &server.admin(),
    );
    assert_eq!(code, 200, "{body}");
    let (key, token) = &forged[0];
    let (code, body) = server.curl("POST", "/v1/issue", Some(issue_web), &bearer(token));
    assert_ne!(code, 200, "{body}");
    wait_logged(&server, key);
}
