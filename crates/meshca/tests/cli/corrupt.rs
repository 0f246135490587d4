//! Records that do not decode, under a running server: a damaged record in
//! the embedded store (redb), and garbage written into etcd under meshca's
//! prefix with `etcdctl put` (records and events). In each case the server
//! never panics, names the record in the error and the log, and keeps
//! serving what does not need it.
//!
//! The two stores differ, by design. etcd records carry a MAC (see
//! crates/meshca-store/src/mac.rs), so garbage there fails its integrity
//! check: a read of it fails naming the key, a listing skips it (what its
//! deletion would have done, which write access can do anyway). A record of
//! the embedded store that does not decode was written by this meshca's
//! store and damaged since (or by an incompatible meshca): a read of it
//! fails naming it, and so does every listing that meets it (the CRL
//! included: a record that cannot be read may be a revocation), so those
//! fail closed until the record is repaired or removed.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use meshca_testkit::EtcdCluster;
use serde_json::Value;

use crate::common::*;
use crate::events::{EventStream, events_only, rotate, rotate_of};

fn serial_of(cert: &Path) -> String {
    let der = meshca_pki::parse_certs(&std::fs::read(cert).unwrap()).unwrap();
    meshca_pki::cert_facts(&der[0]).unwrap().serial.to_hex()
}

/// Asserts a refusal: its status, `error.code`, and a message containing
/// every one of `needles`.
#[track_caller]
fn assert_refused(answer: &(u16, String), status: u16, code: &str, needles: &[&str], what: &str) {
    let v: Value = serde_json::from_str(&answer.1).unwrap_or(Value::Null);
    assert_eq!(
        (answer.0, v["error"]["code"].as_str()),
        (status, Some(code)),
        "{what}: {}",
        answer.1
    );
    let message = v["error"]["message"].as_str().unwrap_or_default();
    for n in needles {
        assert!(message.contains(n), "{what}: {message:?} lacks {n:?}");
    }
}

#[track_caller]
fn assert_served(answer: &(u16, String), what: &str) -> Value {
    assert_eq!(answer.0, 200, "{what}: {}", answer.1);
    serde_json::from_str(&answer.1).unwrap_or(Value::Null)
}

/// Waits (10 s at most) for a line of the server's log that contains every
/// one of `needles`.
#[track_caller]
fn wait_logged(server: &Server, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log =
            String::from_utf8_lossy(&std::fs::read(&server.log).unwrap_or_default()).into_owned();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server's log has no line with {needles:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The server still runs, and never panicked.
#[track_caller]
fn assert_alive(server: &mut Server) {
    let status = server.child.as_mut().unwrap().try_wait().unwrap();
    let log = String::from_utf8_lossy(&std::fs::read(&server.log).unwrap_or_default()).into_owned();
    assert!(status.is_none(), "the server exited ({status:?}):\n{log}");
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    assert_eq!(server.curl("GET", "/healthz", None, &[]).0, 200);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Damages the record of `serial` in the redb file `store` (closed): its
/// profile becomes one no meshca knows, in place and at the same length, as
/// a flipped byte on disk or a newer meshca's record would be. Every copy
/// in the file is damaged (a page redb no longer uses may hold an older
/// one). Returns how many there were.
fn damage_profile(store: &Path, serial: &str) -> usize {
    let mut bytes = std::fs::read(store).unwrap();
    let record = format!(r#"{{"serial":"{serial}""#);
    let (field, damaged) = (
        &br#""profile":"service""#[..],
        &br#""profile":"servicX""#[..],
    );
    let mut copies = 0;
    let mut from = 0;
    while let Some(at) = find(&bytes[from..], record.as_bytes()) {
        let start = from + at;
        // The profile follows the serial, namespace and name.
        let end = (start + 512).min(bytes.len());
        let p = start
            + find(&bytes[start..end], field)
                .unwrap_or_else(|| panic!("no profile in the record of {serial} at {start}"));
        bytes[p..p + field.len()].copy_from_slice(damaged);
        copies += 1;
        from = p + field.len();
    }
    std::fs::write(store, bytes).unwrap();
    copies
}

#[test]
fn a_damaged_record_in_the_embedded_store_is_named_and_listings_fail_closed() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &[]);
    let db = ca.issue("db", "db", &[]);
    let (web_serial, db_serial) = (
        serial_of(&web.join("tls.crt")),
        serial_of(&db.join("tls.crt")),
    );
    // The CLI closed the store: everything is in redb, no journal is left.
    assert!(!ca.dir.join("store.redb.journal-0").exists());
    assert!(damage_profile(&ca.dir.join("store.redb"), &web_serial) >= 1);
    let damaged =
        format!("the record {web_serial} in the store does not decode (unknown variant `servicX`");

    // Offline, the CLI says which record.
    fails(&["--dir", ca.d(), "list"], &[&damaged]);

    let mut srv = Server::start(&ca.dir, &[]);
    let admin = srv.admin();
    // The damaged record: every read of it fails, naming it.
    for path in [
        format!("/v1/certificates/{web_serial}"),
        "/v1/identities/default/web".to_owned(),
    ] {
        let answer = srv.curl("GET", &path, None, &admin);
        assert_refused(&answer, 500, "internal", &[&damaged], &path);
    }
    // Its holder is refused too (not served as default/web, and not told
    // it was never issued).
    let answer = srv.curl("GET", "/v1/identities/default/web", None, &cert_args(&web));
    assert_refused(
        &answer,
        500,
        "internal",
        &[&damaged],
        "web's own certificate",
    );

    // Every other record is read as before.
    let v = assert_served(
        &srv.curl(
            "GET",
            &format!("/v1/certificates/{db_serial}"),
            None,
            &admin,
        ),
        "db's record",
    );
    assert_eq!(v["serial"], db_serial.as_str());
    let v = assert_served(
        &srv.curl("GET", "/v1/identities/default/db", None, &cert_args(&db)),
        "db's own certificate",
    );
    assert_eq!(v["serial"], db_serial.as_str());

    // What lists every record fails closed, naming it: the certificate
    // list, the CRLs, the metrics, a rotation of every identity.
    for (method, path) in [
        ("GET", "/v1/certificates"),
        ("GET", "/v1/crl"),
        ("GET", "/v1/crls"),
        ("GET", "/metrics"),
        ("POST", "/v1/rotate"),
    ] {
        let answer = srv.curl(method, path, None, &admin);
        assert_refused(&answer, 500, "internal", &[&damaged], path);
    }

    // Issuance goes on (an insert reads no other record).
    let v = assert_served(
        &srv.curl("POST", "/v1/issue", Some(r#"{"name":"new"}"#), &admin),
        "a new issuance",
    );
    assert_eq!(v["spiffe_id"], "spiffe://cluster.local/ns/default/sa/new");
    // A revocation is recorded and answered, but reaches no CRL while the
    // damaged record stops every listing (reported with these tests).
    let v = assert_served(
        &srv.curl(
            "POST",
            &format!("/v1/certificates/{db_serial}/revoke"),
            Some("{}"),
            &admin,
        ),
        "revoking db",
    );
    assert_eq!(v["status"], "revoked");
    let answer = srv.curl("GET", "/v1/crl", None, &[]);
    assert_refused(
        &answer,
        500,
        "internal",
        &[&damaged],
        "the CRL after a revocation",
    );
    // Readiness does not look at records: the server says it is ready.
    assert_eq!(srv.curl("GET", "/readyz", None, &[]).0, 200);
    assert_alive(&mut srv);
}

fn etcdctl(cluster: &EtcdCluster, args: &[&str]) {
    let out = cluster.etcdctl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn garbage_written_into_etcd_is_refused_by_name_and_the_rest_is_served() {
    const PREFIX: &str = "/corrupt/";
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
    let mut srv = Server::start(&dir, &[]);
    let admin = srv.admin();
    let out = |name: &str| tmp.path().join(name);
    for name in ["web", "db"] {
        srv.cli_ok(&["issue", name, "--out", out(name).to_str().unwrap()]);
    }
    let (web_serial, db_serial) = (
        serial_of(&out("web").join("tls.crt")),
        serial_of(&out("db").join("tls.crt")),
    );
    let token = srv
        .cli_ok(&["token", "create", "db", "--uses", "2"])
        .trim()
        .to_owned();
    let token_id = token
        .strip_prefix("mct_")
        .and_then(|t| t.split_once('.'))
        .unwrap()
        .0
        .to_owned();
    let stream = EventStream::open(&srv, &admin, Some(0));

    // Garbage under the prefix: over a real certificate record, a record
    // of a serial never issued (and an index key leading to it), a token, a
    // hierarchy with a MAC of zeros, an agent report, and three events that
    // do not decode (not JSON; JSON but not a list; a list of non-events).
    let web_key = format!("{PREFIX}certs/{web_serial}");
    let stray_serial = "7e570000000000000000000000000001";
    let stray_key = format!("{PREFIX}certs/{stray_serial}");
    let token_key = format!("{PREFIX}tokens/deadbeefdeadbeef");
    let hierarchy_key = format!("{PREFIX}hierarchies/ffffffff");
    let agents_key = format!("{PREFIX}blobs/agents/ghost");
    let zeros = format!("mac-v1:{}:{{}}", "0".repeat(64));
    let index_key = format!("{PREFIX}ids/default/db/{stray_serial}");
    let event_key = |n: u32| format!("{PREFIX}events/garbage-{n}");
    for (key, value) in [
        (web_key.clone(), "not a record {"),
        (stray_key.clone(), "\u{1}\u{2}garbage"),
        (index_key, ""),
        (token_key.clone(), "mac-v1:zz:garbage"),
        (hierarchy_key.clone(), zeros.as_str()),
        (agents_key.clone(), "garbage"),
        (event_key(1), "not json"),
        (event_key(2), r#"{"kind":"rotate"}"#),
        (event_key(3), r#"[{"kind":1},"x"]"#),
    ] {
        etcdctl(&cluster, &["put", &key, value]);
    }

    // The event log: what does not decode is skipped, logged, and the next
    // real event reaches the subscriber as if nothing had been there.
    rotate(&srv, "db");
    let got = events_only(stream.read_until(Duration::from_secs(30), rotate_of("db")));
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|e| {
            (
                e.kind.clone(),
                e.data["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    // The two issuances (their events are appended in the background) in
    // either order, then the rotation: nothing of the garbage.
    assert_eq!(seen.len(), 3, "{seen:?}");
    seen[..2].sort();
    assert_eq!(
        seen,
        [
            ("issued".to_owned(), "db".to_owned()),
            ("issued".to_owned(), "web".to_owned()),
            ("rotate".to_owned(), "db".to_owned()),
        ]
    );
    for n in [1, 2] {
        wait_logged(
            &srv,
            &[
                "skipping an event record that does not decode",
                &event_key(n),
            ],
        );
    }
    // The list's two entries reach the server, which skips each (naming
    // its id): the store does not look inside an event.
    let log = String::from_utf8_lossy(&std::fs::read(&srv.log).unwrap()).into_owned();
    assert!(
        log.lines()
            .filter(|l| l.contains("skipping an event that does not decode"))
            .count()
            >= 2,
        "{log}"
    );

    // Certificates: the list leaves out what fails its check; a read of
    // it fails naming it, and so does its holder's call (closed, not open).
    let v = assert_served(&srv.curl("GET", "/v1/certificates", None, &admin), "list");
    let listed: Vec<&str> = v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&db_serial.as_str()), "{listed:?}");
    assert!(!listed.contains(&web_serial.as_str()), "{listed:?}");
    assert!(!listed.contains(&stray_serial), "{listed:?}");
    for (serial, key) in [
        (web_serial.as_str(), web_key.as_str()),
        (stray_serial, stray_key.as_str()),
    ] {
        let answer = srv.curl("GET", &format!("/v1/certificates/{serial}"), None, &admin);
        assert_refused(
            &answer,
            500,
            "internal",
            &[
                &format!("refused the record {key}"),
                "fails its integrity check",
            ],
            key,
        );
    }
    let answer = srv.curl(
        "GET",
        "/v1/identities/default/web",
        None,
        &cert_args(&out("web")),
    );
    assert_refused(
        &answer,
        500,
        "internal",
        &[&format!("refused the record {web_key}")],
        "web's own certificate",
    );
    // db, whose index now also leads to the stray record, is served.
    let v = assert_served(
        &srv.curl(
            "GET",
            "/v1/identities/default/db",
            None,
            &cert_args(&out("db")),
        ),
        "db's own certificate",
    );
    assert_eq!(v["serial"], db_serial.as_str());

    // Tokens: the garbage one is not listed and buys nothing; the real one
    // still buys its certificate.
    let v = assert_served(&srv.curl("GET", "/v1/tokens", None, &admin), "tokens");
    let ids: Vec<&str> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [token_id.as_str()]);
    let forged = format!("mct_deadbeefdeadbeef.{}", "5e".repeat(32));
    let answer = srv.curl(
        "POST",
        "/v1/issue",
        Some(r#"{"name":"db"}"#),
        &bearer(&forged),
    );
    assert_refused(
        &answer,
        500,
        "internal",
        &[
            &format!("refused the record {token_key}"),
            "fails its integrity check",
        ],
        "the garbage token",
    );
    let v = assert_served(
        &srv.curl(
            "POST",
            "/v1/issue",
            Some(r#"{"name":"db"}"#),
            &bearer(&token),
        ),
        "the real token",
    );
    assert_eq!(v["spiffe_id"], "spiffe://cluster.local/ns/default/sa/db");

    // The CA, its CRL and metrics: served, the garbage hierarchy and agent
    // report left out.
    let v = assert_served(&srv.curl("GET", "/v1/ca", None, &admin), "/v1/ca");
    let hierarchies: Vec<&str> = v["hierarchies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(hierarchies.len(), 1, "{hierarchies:?}");
    assert!(!hierarchies.contains(&"ffffffff"));
    assert_eq!(srv.curl("GET", "/v1/crl", None, &[]).0, 200);
    assert_eq!(srv.curl("GET", "/metrics", None, &[]).0, 200);

    // Each refused record is named in the log.
    for key in [
        &web_key,
        &stray_key,
        &token_key,
        &hierarchy_key,
        &agents_key,
    ] {
        wait_logged(&srv, &["integrity check", key]);
    }
    assert_alive(&mut srv);

    // A server started on the store as it is starts and serves.
    drop(stream);
    srv.kill();
    let mut again = Server::start(&dir, &[]);
    let v = assert_served(&again.curl("GET", "/v1/certificates", None, &admin), "list");
    assert!(
        v["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["serial"] == db_serial.as_str()),
        "{v}"
    );
    assert_alive(&mut again);
}
