//! Several `meshca serve` replicas sharing one CA in a real etcd cluster
//! (Debian's etcd-server, three members on loopback ports).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshca_server::auth::PEER_CACHE_TTL;
use meshca_testkit::EtcdCluster;
use serde_json::Value;

use crate::common::*;
use crate::crl;
use crate::events::{EventStream, events_only};

/// A CA in etcd: `init` into replica A's directory, the seal key beside it.
struct Shared {
    tmp: Scratch,
    url: String,
    seal: PathBuf,
}

impl Shared {
    fn init(cluster: &EtcdCluster, prefix: &str) -> Shared {
        let tmp = scratch();
        let url = cluster.store_url(prefix);
        let seal = tmp.path().join("secrets/seal.key");
        let a = tmp.path().join("a");
        let out = run(&[
            "init",
            "--dir",
            a.to_str().unwrap(),
            "--store",
            &url,
            "--seal-key-file",
            seal.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "init --store: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("Created the seal key"));
        assert_eq!(mode(&seal), 0o600);
        Shared { tmp, url, seal }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A replica on its own directory: A was initialised; any other joins
    /// with `--store` and the seal key (its admin/ is copied from A only so
    /// that the test's curl can use the CA bundle and admin certificate).
    fn replica(&self, name: &str) -> Server {
        let dir = self.dir(name);
        if name == "a" {
            return Server::start(&dir, &[]);
        }
        if !dir.join("meshca.toml").exists() {
            copy_dir(&self.dir("a/admin"), &dir.join("admin"));
        }
        Server::start(
            &dir,
            &[
                "--store",
                &self.url,
                "--seal-key-file",
                self.seal.to_str().unwrap(),
            ],
        )
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        // A set's own entries (`..data`, `..set-*`): the visible names,
        // copied through their links, are the files.
        if e.file_name().to_string_lossy().starts_with("..") {
            continue;
        }
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn status(s: &Server) -> Value {
    json(&s.cli_ok(&["ca", "status", "--json"]))
}

fn issue_via(s: &Server, name: &str) -> (u16, String) {
    s.curl(
        "POST",
        "/v1/issue",
        Some(&format!(r#"{{"name":"{name}"}}"#)),
        &s.admin(),
    )
}

fn serial_of(body: &str) -> String {
    json(body)["serial"].as_str().unwrap().to_owned()
}

#[test]
fn replicas_share_one_ca_through_etcd() {
    let cluster = EtcdCluster::start(3);
    let shared = Shared::init(&cluster, "/shared/");
    let a = shared.replica("a");
    let b = shared.replica("b");
    let b_log = std::fs::read_to_string(&b.log).unwrap();
    assert!(b_log.contains("Joined the CA"), "{b_log}");

    // Both serve the same CA: the same root fingerprint, one leader.
    let (sa, sb) = (status(&a), status(&b));
    assert_eq!(sa["root_fingerprint"], sb["root_fingerprint"]);
    assert!(sa["store"].as_str().unwrap().starts_with("etcd://"));
    assert!(
        sa["leader"].as_bool().unwrap() ^ sb["leader"].as_bool().unwrap(),
        "exactly one replica leads: {sa} {sb}"
    );

    // B's event stream sees what A does. Opened from the start of the
    // event log (no event seen yet): whenever it is up, nothing after that
    // is missed.
    let events = EventStream::open(&b, &b.admin(), Some(0));

    // Issue through A, read and revoke through B, see it revoked through A.
    let (code, body) = issue_via(&a, "web");
    assert_eq!(code, 200, "{body}");
    let serial = serial_of(&body);
    // The workload's certificate opens its own event stream at A...
    let wl = shared.dir("web-client");
    std::fs::create_dir_all(&wl).unwrap();
    std::fs::write(
        wl.join("tls.crt"),
        json(&body)["certificate"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        wl.join("tls.key"),
        json(&body)["private_key"].as_str().unwrap(),
    )
    .unwrap();
    let events_code = |s: &Server| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(s.dir.join("admin/ca.crt"))
            .args(cert_args(&wl))
            .arg(format!("{}/v1/events", s.url()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(events_code(&a), "200");
    let (code, got) = b.curl(
        "GET",
        &format!("/v1/certificates/{serial}"),
        None,
        &b.admin(),
    );
    assert_eq!(code, 200, "{got}");
    assert_eq!(json(&got)["status"], "active");
    let (code, out) = b.curl(
        "POST",
        &format!("/v1/certificates/{serial}/revoke"),
        Some(r#"{"reason":"keyCompromise"}"#),
        &b.admin(),
    );
    assert_eq!(code, 200, "{out}");
    let (_, got) = a.curl(
        "GET",
        &format!("/v1/certificates/{serial}"),
        None,
        &a.admin(),
    );
    assert_eq!(json(&got)["status"], "revoked");
    // ...and, revoked at B, is refused at A (A heard of it through the event log).
    let deadline = Instant::now() + Duration::from_secs(5);
    while events_code(&a) != "401" {
        assert!(
            Instant::now() < deadline,
            "A still accepts a certificate revoked at B"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A's CRL revokes it (the revocation reached A through the event log):
    // openssl and GnuTLS refuse the workload's certificate against the
    // intermediate's CRL from A, for keyCompromise, and pass the admin's.
    let bundle = a.dir.join("admin/ca.crt");
    let web_chain = wl.join("tls.crt");
    let crl = shared.dir("crl.pem");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        crl::fetch(&a, "/v1/crl", &crl);
        match crl::verdict(&web_chain, &bundle, &crl) {
            Ok(crl::Verdict::Revoked) => break,
            Ok(crl::Verdict::Good) => {}
            Err(e) => panic!("A's CRL: {e}"),
        }
        assert!(Instant::now() < deadline, "A's CRL never revoked {serial}");
        std::thread::sleep(Duration::from_millis(300));
    }
    crl::assert_checks(
        &web_chain,
        &a.dir.join("admin/tls.crt"),
        &bundle,
        &crl,
        Some("Key Compromise"),
    );
    let seen = events_only(events.read_until(Duration::from_secs(30), |e| {
        e.kind == "revoked" && e.data["serial"] == serial.as_str()
    }));
    assert!(
        seen.iter()
            .any(|e| e.kind == "issued" && e.data["serial"] == serial.as_str()),
        "B's stream lacks A's issuance: {seen:?}"
    );
    drop(events);

    // A one-use token used at both replicas at once: exactly one certificate.
    let token = a
        .cli_ok(&["token", "create", "racer", "--uses", "1"])
        .trim()
        .to_owned();
    let race = |s: &Server| {
        s.curl(
            "POST",
            "/v1/issue",
            Some(r#"{"name":"racer"}"#),
            &bearer(&token),
        )
    };
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let mut all = Vec::new();
        for _ in 0..3 {
            let (x, y) = (scope.spawn(|| race(&a)), scope.spawn(|| race(&b)));
            all.push(x.join().unwrap());
            all.push(y.join().unwrap());
        }
        all
    });
    let (won, lost): (Vec<_>, Vec<_>) = answers.into_iter().partition(|(c, _)| *c == 200);
    assert_eq!(won.len(), 1, "one use, one certificate: {won:?} {lost:?}");
    assert_eq!(
        json(&won[0].1)["spiffe_id"],
        "spiffe://cluster.local/ns/default/sa/racer",
        "{won:?}"
    );
    // Each of the five others was refused because the use was spent (as
    // the audit logs of the replicas that refused them say), not for
    // anything else (an etcd conflict, a 503).
    for (code, body) in &lost {
        assert_eq!(*code, 401, "{body}");
        let e = &json(body)["error"];
        assert_eq!(e["code"], "unauthenticated", "{body}");
        assert_eq!(
            e["message"], "the join token is unknown, expired or used up",
            "{body}"
        );
    }
    let token_id = token
        .strip_prefix("mct_")
        .and_then(|t| t.split('.').next())
        .unwrap();
    let mut uses: Vec<(String, String)> = Vec::new();
    for s in [&a, &b] {
        let audit = std::fs::read_to_string(s.dir.join("audit.log")).unwrap();
        for l in audit.lines().map(json) {
            if l["action"] == "token-use" && l["caller"] == format!("token {token_id}") {
                uses.push((
                    l["outcome"].as_str().unwrap().to_owned(),
                    l["reason"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    uses.sort();
    let mut want: Vec<(String, String)> = (0..5)
        .map(|_| ("refused".to_owned(), "used_up".to_owned()))
        .collect();
    want.push(("allowed".to_owned(), token_id.to_owned()));
    want.sort();
    assert_eq!(uses, want);

    // A replica with another seal key refuses to start, clearly, and writes nothing.
    let wrong = shared.dir("wrong.key");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let c = shared.dir("c");
    fails(
        &[
            "serve",
            "--dir",
            c.to_str().unwrap(),
            "--store",
            &shared.url,
            "--seal-key-file",
            wrong.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &["seal key does not open", "--seal-key-file"],
    );
    assert!(!c.join("meshca.toml").exists());
    // And a second init on the same store changes nothing.
    fails(
        &[
            "init",
            "--dir",
            shared.dir("d").to_str().unwrap(),
            "--store",
            &shared.url,
            "--seal-key-file",
            shared.seal.to_str().unwrap(),
        ],
        &["already holds a CA"],
    );
    // No key material in etcd in clear.
    let dump = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &cluster.endpoints().join(","),
            "get",
            "--prefix",
            "/shared/",
        ])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("/shared/hierarchies/") && dump.contains("sealed_keys"));
    assert!(
        !dump.contains("PRIVATE KEY"),
        "a private key is in etcd in clear"
    );
}

#[test]
fn the_cluster_survives_losing_its_leader_and_an_etcd_member() {
    let cluster = EtcdCluster::start(3);
    let shared = Shared::init(&cluster, "/ha/");
    let a = shared.replica("a");
    let b = shared.replica("b");
    // Wait for the election to settle.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut leader, follower) = loop {
        let (sa, sb) = (status(&a), status(&b));
        if sa["leader"] == true {
            break (a, b);
        }
        if sb["leader"] == true {
            break (b, a);
        }
        assert!(Instant::now() < deadline, "nobody leads");
        std::thread::sleep(Duration::from_millis(300));
    };

    // Load on both replicas; every answered issuance is remembered, with
    // the replica that answered it.
    let answered = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, s) in [&leader, &follower].into_iter().enumerate() {
        let (dir, url) = (s.dir.clone(), s.url());
        let (answered, failures, stop) = (answered.clone(), failures.clone(), stop.clone());
        load.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let out = Command::new("curl")
                    .args(["-s", "--max-time", "10", "-w", "\n%{http_code}", "--cacert"])
                    .arg(dir.join("admin/ca.crt"))
                    .args(cert_args(&dir.join("admin")))
                    .args(["-H", "Content-Type: application/json"])
                    .args(["--data-binary", &format!(r#"{{"name":"load{i}-{n}"}}"#)])
                    .arg(format!("{url}/v1/issue"))
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
                if code == "200" {
                    answered.lock().unwrap().push((i, serial_of(body)));
                } else {
                    failures.lock().unwrap().push(format!("{i}: {code} {body}"));
                }
            }
        }));
    }
    // Under way on both before anything is taken down.
    let answered_by = |i: usize| {
        answered
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| *r == i)
            .count()
    };
    eventually(
        "both replicas to answer the load",
        Duration::from_secs(30),
        || answered_by(0) >= 3 && answered_by(1) >= 3,
    );

    // kill -9 the leader replica: the follower leads within 15 s.
    leader.kill();
    let killed = Instant::now();
    loop {
        if status(&follower)["leader"] == true {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no new leader within 15 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let takeover = killed.elapsed();
    println!("new leader after {takeover:?}");

    // One etcd member down: issuance through the survivor goes on.
    cluster.stop_member(0);
    let before = answered_by(1);
    eventually(
        "issuance through the survivor to go on with one etcd member down",
        Duration::from_secs(30),
        || answered_by(1) > before + 5,
    );
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }

    // Every answered issuance is in the store, seen from the survivor.
    let listed = json(&follower.cli_ok(&["list", "--json"]));
    let known: std::collections::HashSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["serial"].as_str())
        .collect();
    let answered = answered.lock().unwrap();
    assert!(answered.len() > 20, "too little load: {}", answered.len());
    for (_, s) in answered.iter() {
        assert!(
            known.contains(s.as_str()),
            "answered {s} is not in the store"
        );
    }
    // Only the killed replica's requests may have failed.
    for f in failures.lock().unwrap().iter() {
        assert!(
            f.starts_with("0:"),
            "the surviving replica failed a request: {f}"
        );
    }

    // Two members down (no quorum): fast, clear 503s (within curl's own
    // 15 s, or it gives up and the status is 0) and a red /readyz.
    cluster.stop_member(1);
    let mut bounded = follower.admin();
    bounded.extend(["--max-time".to_owned(), "15".to_owned()]);
    let (code, body) = follower.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"no-quorum"}"#),
        &bounded,
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("etcd"), "{body}");
    let (code, _) = follower.curl("GET", "/readyz", None, &[]);
    assert_eq!(code, 503);

    // They come back: the replica recovers by itself.
    cluster.restart_member(0);
    cluster.restart_member(1);
    let back = Instant::now();
    loop {
        let (code, body) = issue_via(&follower, "after");
        if code == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "no recovery within 30 s: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, _) = follower.curl("GET", "/readyz", None, &[]);
    assert_eq!(code, 200);

    // The killed replica restarts from its directory and rejoins.
    let dir = leader.dir.clone();
    leader = Server::start(&dir, &[]);
    let (code, body) = issue_via(&leader, "rejoined");
    assert_eq!(code, 200, "{body}");
}

#[test]
fn a_ca_moves_from_the_embedded_store_to_etcd_and_back() {
    let cluster = EtcdCluster::start(1);
    let ca = Ca::new(&[]);
    ca.issue("web", "web", &[]);
    ca.issue("db", "db", &[]);
    let records = ca.count();
    let root = json(&ok(&["--dir", ca.d(), "ca", "status", "--json"]))["root_fingerprint"].clone();
    let url = cluster.store_url("/moved/");
    let seal = ca.p("seal.key");

    // Bad store settings: refused, named, nothing written.
    let nowhere = ca.p("nowhere");
    fails(
        &["init", "--dir", &nowhere, "--store", "mysql://db"],
        &["invalid --store", "mysql://db"],
    );
    let short = ca.p("short.key");
    std::fs::write(&short, "abcd\n").unwrap();
    std::fs::set_permissions(&short, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fails(
        &[
            "init",
            "--dir",
            &nowhere,
            "--store",
            &url,
            "--seal-key-file",
            &short,
        ],
        &["seal key", "short.key", "64 hex digits"],
    );
    assert!(!ca.path("nowhere").exists());

    let out = ok(&[
        "store",
        "copy",
        "--from",
        ca.d(),
        "--to",
        &url,
        "--seal-key-file",
        &seal,
    ]);
    assert!(
        out.contains("Verified") && out.contains(&format!("{records} certificate records")),
        "{out}"
    );
    // Into a store that holds a CA: refused, nothing changed.
    fails(
        &[
            "store",
            "copy",
            "--from",
            ca.d(),
            "--to",
            &url,
            "--seal-key-file",
            &seal,
        ],
        &["already holds a CA"],
    );

    // A replica on the copy serves the same CA with the same records.
    let replica_dir = ca.path("replica");
    copy_dir(&ca.dir.join("admin"), &replica_dir.join("admin"));
    let replica = Server::start(&replica_dir, &["--store", &url, "--seal-key-file", &seal]);
    let status = status(&replica);
    assert_eq!(status["root_fingerprint"], root);
    // Every copied record, and the replica's own serving certificate.
    let listed = json(&replica.cli_ok(&["list", "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), records + 1);
    let (code, body) = issue_via(&replica, "after-move");
    assert_eq!(code, 200, "{body}");
    drop(replica);

    // And back into a new data directory, which works offline.
    let back = ca.p("back");
    let wrong = ca.p("wrong.key");
    std::fs::write(&wrong, format!("{}\n", "cd".repeat(32))).unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fails(
        &[
            "store",
            "copy",
            "--from",
            &url,
            "--to",
            &back,
            "--seal-key-file",
            &wrong,
        ],
        &["seal key does not open"],
    );
    let out = ok(&[
        "store",
        "copy",
        "--from",
        &url,
        "--to",
        &back,
        "--seal-key-file",
        &seal,
    ]);
    assert!(out.contains("Verified"), "{out}");
    let key = std::fs::read_dir(ca.path("back/ca"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&key.join("intermediate.key")), 0o600);
    assert_eq!(
        json(&ok(&["--dir", &back, "ca", "status", "--json"]))["root_fingerprint"],
        root
    );
    assert_eq!(
        json(&ok(&["--dir", &back, "list", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        records + 2
    );
    ok(&[
        "--dir",
        &back,
        "issue",
        "offline",
        "--out",
        &ca.p("offline"),
    ]);
}

/// A test PKI for etcd, made by openssl: CA, server (127.0.0.1), client.
fn etcd_pki(dir: &Path) -> meshca_testkit::EtcdTlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-subj",
        "/CN=test etcd CA",
        "-days",
        "2",
    ]);
    tool("openssl", &args);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, crt, cnf) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.crt")),
            p(&format!("{name}.cnf")),
        );
        std::fs::write(&cnf, ext).unwrap();
        let mut args = vec!["req"];
        args.extend(ec);
        let subj = format!("/CN={name}");
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        tool("openssl", &args);
        tool(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &cnf,
            ],
        );
    }
    meshca_testkit::EtcdTlsFiles {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

#[test]
fn etcd_over_tls_with_client_certificates_and_a_password() {
    let tmp = scratch();
    let pki = etcd_pki(&tmp.path().join("pki"));
    let cluster = EtcdCluster::start_tls(1, pki.clone());
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "meshca:s3cret"],
        &["user", "grant-role", "meshca", "root"],
        &["auth", "enable"],
    ] {
        let out = cluster.etcdctl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pw = tmp.path().join("etcd-password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let bad = tmp.path().join("bad-password");
    std::fs::write(&bad, "wrong\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let url = cluster.store_url("/secure/");
    let seal = tmp.path().join("seal.key");
    let dir = tmp.path().join("a");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let tls_args = |password: &Path| {
        vec![
            "--store".to_owned(),
            url.clone(),
            "--seal-key-file".to_owned(),
            s(&seal),
            "--etcd-ca".to_owned(),
            s(&pki.ca),
            "--etcd-cert".to_owned(),
            s(&pki.client_cert),
            "--etcd-key".to_owned(),
            s(&pki.client_key),
            "--etcd-user".to_owned(),
            "meshca".to_owned(),
            "--etcd-password-file".to_owned(),
            s(password),
        ]
    };
    // A wrong password: refused, said so, nothing written.
    let mut args = vec!["init".to_owned(), "--dir".to_owned(), s(&dir)];
    args.extend(tls_args(&bad));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&argv, &["authentication failed"]);
    assert!(!dir.exists());
    // Plain http to an https etcd: refused clearly.
    fails(
        &[
            "init",
            "--dir",
            &s(&dir),
            "--store",
            &url,
            "--seal-key-file",
            &s(&seal),
        ],
        &["etcd", "unavailable", "--etcd-ca"],
    );
    // The right settings: init, then a server whose meshca.toml remembers them.
    let mut args = vec!["init".to_owned(), "--dir".to_owned(), s(&dir)];
    args.extend(tls_args(&pw));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&argv);
    let toml = std::fs::read_to_string(dir.join("meshca.toml")).unwrap();
    assert!(
        toml.contains("etcd_user = \"meshca\"") && !toml.contains("s3cret"),
        "{toml}"
    );
    let server = Server::start(&dir, &[]);
    let (code, body) = issue_via(&server, "over-tls");
    assert_eq!(code, 200, "{body}");
    // The password never reaches the logs.
    let log_path = server.log.clone();
    drop(server);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("meshca serving"), "{log}");
    assert!(!log.contains("s3cret"));
}

#[test]
fn a_root_rotation_taken_on_one_replica_reaches_the_other() {
    let cluster = EtcdCluster::start(1);
    let shared = Shared::init(&cluster, "/rot/");
    let a = shared.replica("a");
    let b = shared.replica("b");
    let bundle_of = |s: &Server| split_pem(&s.curl("GET", "/v1/bundle", None, &[]).1).len();
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "{what} within 20s");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (code, body) = issue_via(&b, "web");
    assert_eq!(code, 200, "{body}");
    // Held by nobody who renews it: retire waits for it (holders, not
    // identities) until it is revoked below.
    let unheld = serial_of(&body);
    // An agent connected to B: A learns of it (and of the bundle it holds)
    // through the store.
    let token = json(&b.cli_ok(&["token", "create", "api", "--json"]));
    let agent_dir = shared.dir("api");
    let _agent = spawn_cmd(
        meshca()
            .args([
                "agent",
                "api",
                "--server",
                &b.url(),
                "--token",
                token["token"].as_str().unwrap(),
                "--ca-fingerprint",
                token["ca_fingerprint"].as_str().unwrap(),
                "--out",
                agent_dir.to_str().unwrap(),
                "--ttl",
                "1m",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(kept_log("replicas")),
    );
    let agents_seen_by_a =
        || json(&a.cli_ok(&["ca", "status", "--json"]))["rotation"]["agents"].clone();
    wait("A to know B's agent", &|| agents_seen_by_a()["alive"] == 1);

    // prepare on A: B hears of it through etcd and serves both roots; the
    // new keys are sealed in etcd like the first ones; B's agent fetches the
    // new bundle and A sees that it did.
    a.cli_ok(&["ca", "rotate", "prepare"]);
    wait("B to serve the new bundle", &|| bundle_of(&b) == 2);
    wait("A to see B's agent acknowledge the bundle", &|| {
        agents_seen_by_a()["acknowledged"] == 1
    });
    let dump = cluster
        .etcdctl()
        .args(["get", "--prefix", "/rot/hierarchies/"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert_eq!(dump.matches("sealed_keys").count(), 2, "{dump}");
    assert!(
        !dump.contains("PRIVATE KEY"),
        "CA keys must be sealed in etcd"
    );

    // activate on A: B signs with the new hierarchy too.
    a.cli_ok(&["ca", "rotate", "activate", "--window", "1s"]);
    let new_root = json(&a.cli_ok(&["ca", "status", "--json"]))["root_fingerprint"].clone();
    wait("B to sign with the new hierarchy", &|| {
        json(&b.cli_ok(&["ca", "status", "--json"]))["root_fingerprint"] == new_root
    });
    let (code, body) = issue_via(&b, "web");
    assert_eq!(code, 200, "{body}");
    let new_hierarchy = json(&a.cli_ok(&["ca", "status", "--json"]))["rotation"]["new"].clone();
    let serial = serial_of(&body);
    let rec = json(&a.cli_ok(&["list", "--json"]));
    let issued = rec
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["serial"] == serial.as_str())
        .unwrap()
        .clone();
    assert_eq!(issued["hierarchy_id"], new_hierarchy, "{issued}");

    // retire on A once nothing holds the old root: B drops it as well and
    // serves a certificate of the new root. The admin-issued certificate
    // nobody renews keeps it back until it is revoked.
    let status = json(&a.cli_ok(&["ca", "status", "--json"]));
    assert!(
        status["rotation"]["waiting_for"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["serial"] == unheld.as_str()),
        "{status}"
    );
    a.cli_ok(&["revoke", &unheld]);
    wait("every holder renewed", &|| {
        json(&a.cli_ok(&["ca", "status", "--json"]))["rotation"]["remaining_under_old"] == 0
    });
    a.cli_ok(&["ca", "rotate", "retire"]);
    wait("B to drop the old root", &|| bundle_of(&b) == 1);
    let root = shared.dir("new-root.pem");
    std::fs::write(&root, b.curl("GET", "/v1/bundle", None, &[]).1).unwrap();
    wait("B to serve a certificate of the new root", &|| {
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--cacert", root.to_str().unwrap()])
            .arg(format!("{}/healthz", b.url()))
            .status()
            .is_ok_and(|s| s.success())
    });
}

#[test]
fn etcd_out_of_space_fails_closed_and_recovers() {
    // A 4 MiB quota, filled by someone else's data until etcd raises NOSPACE.
    let cluster = EtcdCluster::start_with_args(1, &["--quota-backend-bytes", "4194304"]);
    let shared = Shared::init(&cluster, "/full/");
    let a = shared.replica("a");
    let (code, body) = issue_via(&a, "before");
    assert_eq!(code, 200, "{body}");
    let count = || {
        json(&a.cli_ok(&["list", "--json"]))
            .as_array()
            .unwrap()
            .len()
    };
    let before = count();
    let blob = "x".repeat(100 * 1024);
    let mut full = false;
    for i in 0..400 {
        let out = cluster
            .etcdctl()
            .args(["put", &format!("/junk/{i}"), &blob])
            .output()
            .unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("space exceeded"), "{err}");
            full = true;
            break;
        }
    }
    assert!(full, "etcd never ran out of space");
    // Issuance fails closed, with etcd's reason, and records nothing.
    for _ in 0..3 {
        let (code, body) = issue_via(&a, "during");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("space exceeded"), "{body}");
    }
    assert_eq!(count(), before, "nothing half-written");
    assert_eq!(
        a.curl("GET", "/healthz", None, &[]).0,
        200,
        "the server keeps serving"
    );
    // The operator frees space: delete, compact, defragment, disarm the alarm.
    cluster
        .etcdctl()
        .args(["del", "--prefix", "/junk/"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(
        &cluster
            .etcdctl()
            .args(["endpoint", "status", "-w", "json"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let rev = json(&status)[0]["Status"]["header"]["revision"]
        .as_i64()
        .unwrap();
    cluster
        .etcdctl()
        .args(["compact", &rev.to_string()])
        .output()
        .unwrap();
    cluster.etcdctl().args(["defrag"]).output().unwrap();
    cluster
        .etcdctl()
        .args(["alarm", "disarm"])
        .output()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = issue_via(&a, "after");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {code} {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(count(), before + 1);
}

/// Property 5 of the trust model: a revocation that one replica never
/// hears of (its event lost: B stopped while A revoked, and the event gone
/// from etcd before B looked, as after a failed publish or past the
/// retention) still takes effect there within the peer cache's 10 s: B had
/// the certificate cached as good, and refuses it once it reads the record
/// again.
#[test]
fn a_revocation_a_replica_never_hears_of_takes_effect_within_ten_seconds() {
    let cluster = EtcdCluster::start(1);
    let shared = Shared::init(&cluster, "/lost/");
    let a = shared.replica("a");
    let b = shared.replica("b");
    let web = shared.dir("web");
    a.cli_ok(&["issue", "web", "--out", web.to_str().unwrap()]);
    let (code, body) = b.curl("GET", "/v1/identities/default/web", None, &cert_args(&web));
    assert_eq!(code, 200, "B takes the certificate: {body}");
    let serial = tool(
        "openssl",
        &[
            "x509",
            "-noout",
            "-serial",
            "-in",
            web.join("tls.crt").to_str().unwrap(),
        ],
    );
    let serial = serial.trim().trim_start_matches("serial=").to_lowercase();

    let pid = b.child.as_ref().unwrap().id().to_string();
    tool("kill", &["-STOP", &pid]);
    // B's connections to etcd are cut while it is stopped (what a network
    // partition does): whatever etcd had sent on its watch is gone with
    // them, and B must reconnect, reading the events etcd still holds.
    let etcd_port = cluster.endpoints()[0]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let sockets = tool("ss", &["-tnpH", "state", "established"]);
    let mut cut = 0;
    for line in sockets
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
    {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (local, peer) = (cols[2], cols[3]);
        if peer.ends_with(&format!(":{etcd_port}")) {
            let lport = local.rsplit(':').next().unwrap();
            // (`ss -K` prints a harmless RTNETLINK complaint on some
            // kernels; its status is not what tells, the timing below is.)
            let _ = Command::new("ss")
                .args(["-K", "src", "127.0.0.1", "sport", "=", &format!(":{lport}")])
                .output();
            cut += 1;
        }
    }
    assert!(cut > 0, "B has no connection to etcd to cut: {sockets}");
    a.cli_ok(&["revoke", &serial]);
    let out = cluster
        .etcdctl()
        .args(["del", "--prefix", "/lost/events/"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "no event was deleted"
    );
    tool("kill", &["-CONT", &pid]);
    let resumed = Instant::now();
    // One deadline: the peer cache's 10 s, and slack for a loaded machine.
    // How long it took is printed, not asserted.
    let deadline = resumed + PEER_CACHE_TTL + Duration::from_secs(5);
    let answer = loop {
        let (code, body) = b.curl("GET", "/v1/identities/default/web", None, &cert_args(&web));
        // 200, or 404 once B's listing no longer shows it live: either
        // way the caller was authenticated by the stale cache entry.
        if code == 401 || Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let took = resumed.elapsed();
    assert_eq!(
        answer.0, 401,
        "B still takes the revoked certificate after {took:?}: {}",
        answer.1
    );
    assert!(answer.1.contains("is revoked"), "{}", answer.1);
    println!("B refused the certificate revoked behind its back {took:?} after it resumed");
    let (code, _) = b.curl("GET", "/v1/ca", None, &b.admin());
    assert_eq!(code, 200, "B still serves");
}
