//! Root rotation under live traffic: agents keep identities fresh, a
//! `meshca proxy` serves mTLS with each identity, and clients in every pair
//! call each other the whole time; prepare, activate and retire must not
//! fail one request. `MESHCA_ROTATION_AGENTS` sets how many (default 20).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::proxy::{output_of, progress_of, run_within};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn roots_in(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .map(|t| t.matches("BEGIN CERTIFICATE").count())
        .unwrap_or(0)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what} within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// Calls every service with every identity's current files (read again for
/// each request, as a service that reloads would), in a ring that shifts
/// each round so that every pair talks. Runs until the stop file exists;
/// after each call, "OK FAILED" counts go to the progress file (replaced
/// as one); at the end it prints "ok N failed M" and the first failures.
///
/// Each load reads one set, as a reader of the `..data` layout does: the
/// link is resolved once and the three files are loaded from the directory
/// it names. Nothing is retried on a bad load: a key with another set's
/// certificate is an `ssl.SSLError`, a directory without `..data` an
/// `OSError`, and either fails the test. The one case loaded again is a
/// file missing from a directory `..data` no longer names (the agent removes
/// the old set after the switch, possibly between the resolution and the
/// load): the new set is loaded, only when `..data` has moved.
const CALLERS: &str = r#"
import os, socket, ssl, sys, threading
base, ports, stop, progress = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], sys.argv[3], sys.argv[4]
n = len(ports); ok = [0]; bad = []; lock = threading.Lock()
def note():
    with open(progress + ".tmp", "w") as f: f.write(f"{ok[0]} {len(bad)}")
    os.replace(progress + ".tmp", progress)
def context(i):
    d = os.path.join(base, f"svc{i}")
    for _ in range(3):
        gen = os.readlink(os.path.join(d, "..data"))
        g = os.path.join(d, gen)
        try:
            ctx = ssl.create_default_context(cafile=os.path.join(g, "ca.crt"))
            ctx.load_cert_chain(os.path.join(g, "tls.crt"), os.path.join(g, "tls.key"))
            return ctx
        except FileNotFoundError:
            if os.readlink(os.path.join(d, "..data")) == gen:
                raise
    raise RuntimeError(f"the set of svc{i} switched three times during one load")
def caller(t):
    shift = 1 + t
    while not os.path.exists(stop):
        for i in range(t, n, 4):
            j = (i + shift) % n
            if j == i: j = (j + 1) % n
            try:
                c = context(i).wrap_socket(socket.create_connection(("127.0.0.1", ports[j]), timeout=10), server_hostname=f"svc{j}.default.svc")
                c.sendall(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while True:
                    b = c.recv(65536)
                    if not b: break
                    data += b
                c.close()
                with lock:
                    if data.startswith(b"HTTP/1.0 200"): ok[0] += 1
                    else: bad.append(f"svc{i}->svc{j}: {data[:60]!r}")
                    note()
            except Exception as e:
                with lock:
                    bad.append(f"svc{i}->svc{j}: {e!r}"); note()
        shift = shift % (n - 1) + 1
ts = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print("ok", ok[0], "failed", len(bad), bad[:5])
"#;

/// Copies `tls.crt` and `tls.key` of one set of `dir` (read through one
/// `..data`) into `to`; returns their paths.
fn pair_of(dir: &Path, to: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(to).unwrap();
    let files = meshca_files::open_set(&[&dir.join("tls.crt"), &dir.join("tls.key")]).unwrap();
    let mut out = Vec::new();
    for (f, name) in files.into_iter().zip(["tls.crt", "tls.key"]) {
        let bytes = f.read(1 << 20).unwrap();
        let path = to.join(name);
        meshca_files::write_atomic(&path, &bytes, 0o600).unwrap();
        out.push(path);
    }
    (out[0].clone(), out[1].clone())
}

fn agents_wanted() -> usize {
    std::env::var("MESHCA_ROTATION_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[test]
fn root_rotation_under_traffic_fails_no_request() {
    rotate_under_traffic(agents_wanted(), false);
}

#[test]
fn automatic_root_rotation_under_traffic_fails_no_request() {
    rotate_under_traffic(agents_wanted(), true);
}

/// Whether the proxy on `port` serves a certificate that verifies against
/// `root` alone, to a client presenting the pair `(cert, key)`.
fn serves_under(port: u16, cert: &Path, key: &Path, root: &Path) -> bool {
    let out = run_within(
        Command::new("sh").args([
            "-c",
            &format!(
                "openssl s_client -connect 127.0.0.1:{port} -cert {c} -key {k} -CAfile {ca} -verify_return_error </dev/null 2>&1 | grep -c 'Verify return code: 0'",
                c = p(cert),
                k = p(key),
                ca = p(root),
            ),
        ]),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

fn rotate_under_traffic(agents: usize, auto: bool) {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let site = tmp.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "hello\n").unwrap();
    let (_site, site_port) = start_listening(
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
                p(&site),
            ])
            .stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    let site_port = site_port[0];
    // The bundle before the rotation: the old root alone.
    let (code, old_bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(code, 200, "{old_bundle}");

    // The agents, each with its own join token, and a proxy per identity.
    let mut children = Vec::new();
    let mut ports = Vec::new();
    let dirs: Vec<PathBuf> = (0..agents)
        .map(|i| tmp.path().join(format!("svc{i}")))
        .collect();
    for (i, dir) in dirs.iter().enumerate() {
        let name = format!("svc{i}");
        let v: Value =
            serde_json::from_str(&srv.cli_ok(&["token", "create", &name, "--json"])).unwrap();
        let agent = spawn_cmd(
            meshca()
                .args([
                    "agent",
                    &name,
                    "--server",
                    &srv.url(),
                    "--token",
                    v["token"].as_str().unwrap(),
                    "--ca-fingerprint",
                    v["ca_fingerprint"].as_str().unwrap(),
                    "--out",
                    p(dir),
                    "--ttl",
                    "2m",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(tmp.path().join(format!("agent{i}.log"))).unwrap()),
        );
        children.push(agent);
    }
    for dir in &dirs {
        wait_until("the agent's first certificate", 30, || {
            dir.join("tls.key").exists()
        });
    }
    // A proxy per identity, each on a port of its own (started again
    // elsewhere when its port was taken), each listening before the next.
    for (i, dir) in dirs.iter().enumerate() {
        let (proxy, port) = start_listening(
            1,
            &tmp.path().join(format!("proxy{i}.log")),
            |chosen| {
                let mut cmd = meshca();
                cmd.args([
                    "proxy",
                    "server",
                    "--listen",
                    &format!("127.0.0.1:{}", chosen[0]),
                    "--target",
                    &format!("127.0.0.1:{site_port}"),
                    "--certs",
                    p(dir),
                ])
                .stdin(Stdio::null());
                cmd
            },
            |_| true,
        );
        children.push(proxy);
        ports.push(port[0]);
    }
    let stop = tmp.path().join("stop");
    let progress = tmp.path().join("progress");
    let ports_arg = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut callers = spawn_cmd(
        Command::new("python3")
            .args([
                "-c",
                CALLERS,
                p(tmp.path()),
                &ports_arg,
                p(&stop),
                p(&progress),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(tmp.path().join("callers.log")).unwrap()),
    );
    let calls = || progress_of(&progress).0;
    let round = u64::try_from(agents).unwrap();
    // The traffic is flowing before the rotation starts: a round's worth
    // of calls went through.
    wait_until("the callers' first round of calls", 60, || calls() >= round);
    let status = |srv: &Server| -> Value {
        serde_json::from_str::<Value>(&srv.cli_ok(&["ca", "status", "--json"])).unwrap()["rotation"]
            .clone()
    };

    let (t_prepare, t_activate, t_retire) = if auto {
        // One command runs the three stages, each once it is safe.
        let t = Instant::now();
        let out = srv.cli_ok(&[
            "ca",
            "rotate",
            "auto",
            "--window",
            "5s",
            "--stage-timeout",
            "90s",
        ]);
        assert!(out.contains("root rotation done"), "{out}");
        wait_until("every agent to drop the old root", 60, || {
            dirs.iter().all(|d| roots_in(&d.join("ca.crt")) == 1)
        });
        (Duration::ZERO, t.elapsed(), Duration::ZERO)
    } else {
        // prepare: every agent must hold both roots, and say so, before activation.
        srv.cli_ok(&["ca", "rotate", "prepare"]);
        let t_prepare = wait_until(
            "every agent to fetch and acknowledge the new bundle",
            60,
            || {
                let r = status(&srv);
                dirs.iter().all(|d| roots_in(&d.join("ca.crt")) == 2)
                    && r["agents"]["acknowledged"] == agents
                    && r["safe_to_continue"] == true
            },
        );
        assert_eq!(status(&srv)["stage"], "prepared");
        // The new root: the one the bundle holds now that it did not before.
        let (_, both) = srv.curl("GET", "/v1/bundle", None, &[]);
        let new_root: String = split_pem(&both)
            .into_iter()
            .filter(|c| !old_bundle.contains(c.as_str()))
            .collect();
        assert_eq!(split_pem(&new_root).len(), 1, "{both}");
        let new_root_file = tmp.path().join("prepared-root.pem");
        std::fs::write(&new_root_file, &new_root).unwrap();

        // activate: every identity renews under the new root, spread over 5 s.
        srv.cli_ok(&["ca", "rotate", "activate", "--window", "5s"]);
        let t_activate = wait_until("every identity to renew under the new root", 90, || {
            status(&srv)["remaining_under_old"] == 0
        });
        // Retire only once every proxy has taken its new files (it reloads
        // them within its poll): each serves a certificate of the new root.
        let mut pending: Vec<usize> = (0..agents).collect();
        wait_until(
            "every proxy to serve a certificate of the new root",
            60,
            || {
                pending.retain(|&i| {
                    let (c, k) = pair_of(
                        &dirs[(i + 1) % agents],
                        &tmp.path().join(format!("probe{i}")),
                    );
                    !serves_under(ports[i], &c, &k, &new_root_file)
                });
                pending.is_empty()
            },
        );

        // retire: the old root leaves every bundle.
        srv.cli_ok(&["ca", "rotate", "retire"]);
        let t_retire = wait_until("every agent to drop the old root", 60, || {
            dirs.iter().all(|d| roots_in(&d.join("ca.crt")) == 1)
        });
        (t_prepare, t_activate, t_retire)
    };
    // Traffic goes on with the old root gone from every bundle: another
    // round's worth of calls after that, then the callers stop.
    let after_retire = calls();
    wait_until("a round of calls after the rotation", 60, || {
        calls() >= after_retire + round
    });
    std::fs::write(&stop, "").unwrap();
    let (exit, text) = output_of(&mut callers, "the callers", Duration::from_secs(60));
    let ok: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        exit.success() && text.contains("failed 0 ") && ok > 100,
        "requests during the rotation: {text}{}",
        std::fs::read_to_string(tmp.path().join("callers.log")).unwrap_or_default()
    );

    // At the end every served certificate chains to the new root only, and
    // the bundle holds the new root only.
    let (code, bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(code, 200);
    assert_eq!(split_pem(&bundle).len(), 1, "{bundle}");
    let new_root = tmp.path().join("new-root.pem");
    std::fs::write(&new_root, &bundle).unwrap();
    for (i, port) in ports.iter().enumerate() {
        // The client pair of one set (an agent may renew meanwhile).
        let (c, k) = pair_of(
            &dirs[(i + 1) % agents],
            &tmp.path().join(format!("pair{i}")),
        );
        assert!(
            serves_under(*port, &c, &k, &new_root),
            "svc{i} must serve a certificate of the new root"
        );
    }
    eprintln!(
        "rotation timings with {agents} agents (auto: {auto}, auto gives the total as activate): prepare→all bundles {:.1}s, activate→all renewed {:.1}s, retire→all bundles {:.1}s; {ok} requests, none failed",
        t_prepare.as_secs_f64(),
        t_activate.as_secs_f64(),
        t_retire.as_secs_f64()
    );
    drop(children);
}

#[test]
fn unsafe_rotation_steps_are_refused_and_abort_goes_back() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let refused = |args: &[&str], needle: &str| {
        let out = srv.cli(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    };
    refused(&["ca", "rotate", "activate"], "no prepared hierarchy");
    refused(&["ca", "rotate", "retire"], "nothing to retire");
    refused(&["ca", "rotate", "abort"], "no rotation under way");

    // An agent that was alive with the old bundle and is gone now holds
    // activation up (it is still counted for ten minutes).
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--json"])).unwrap();
    let out = tmp.path().join("web");
    let mut agent = spawn_cmd(
        meshca()
            .args([
                "agent",
                "web",
                "--server",
                &srv.url(),
                "--token",
                v["token"].as_str().unwrap(),
                "--ca-fingerprint",
                v["ca_fingerprint"].as_str().unwrap(),
                "--out",
                p(&out),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(kept_log("rotation")),
    );
    wait_until("the agent's certificate", 30, || {
        out.join("tls.key").exists()
    });
    let status = || {
        serde_json::from_str::<Value>(&srv.cli_ok(&["ca", "status", "--json"])).unwrap()["rotation"]
            .clone()
    };
    wait_until("the agent to be known", 10, || {
        status()["agents"]["alive"] == 1
    });
    agent.end();

    srv.cli_ok(&["ca", "rotate", "prepare"]);
    refused(&["ca", "rotate", "prepare"], "already prepared");
    let (_, bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(split_pem(&bundle).len(), 2);
    let r = status();
    assert_eq!(r["safe_to_continue"], false, "{r}");
    // Known by the certificate it holds: one holder of default/web.
    assert!(
        r["agents"]["lagging"][0]
            .as_str()
            .is_some_and(|h| h.starts_with("default/web/")),
        "{r}"
    );
    refused(&["ca", "rotate", "activate"], "default/web");

    // abort before activation: back to the old root alone.
    srv.cli_ok(&["ca", "rotate", "abort"]);
    let (_, bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(split_pem(&bundle).len(), 1);
    assert_eq!(status()["stage"], "idle");

    // abort after activation (forced past the lagging agent): the old
    // hierarchy signs again, the new one retires once nothing uses it.
    let before = srv.cli_ok(&["ca", "status", "--json"]);
    let old_fp = serde_json::from_str::<Value>(&before).unwrap()["root_fingerprint"].clone();
    srv.cli_ok(&["ca", "rotate", "prepare"]);
    srv.cli_ok(&["ca", "rotate", "activate", "--force", "--window", "1s"]);
    refused(&["ca", "rotate", "retire"], "--force");
    srv.cli_ok(&["ca", "rotate", "abort"]);
    let after: Value = serde_json::from_str(&srv.cli_ok(&["ca", "status", "--json"])).unwrap();
    assert_eq!(
        after["root_fingerprint"], old_fp,
        "the old root signs again"
    );
    assert_eq!(after["rotation"]["stage"], "activated", "{after}");
    srv.cli_ok(&["ca", "rotate", "retire", "--force"]);
    let (_, bundle) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(split_pem(&bundle).len(), 1);
    // The admin credentials moved back with the signing hierarchy: the
    // operator still gets in once the server trusts the old root alone.
    let old_root = tmp.path().join("old-root.pem");
    std::fs::write(&old_root, &bundle).unwrap();
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            p(&old_root),
            "-untrusted",
            p(&d.join("admin/tls.crt")),
            p(&d.join("admin/tls.crt")),
        ],
    );
    // An absence check, only as strong as the time it waits: for 2 s after
    // the forced retire, longer than the 1 s window over which the forced
    // activation spread its rotate events (all out by now) and than this
    // replica's follow of the bundle-changed events the steps published
    // (each makes it read the hierarchies from the store again), nothing
    // moves the CA: the old root still signs and no rotation is under way.
    std::thread::sleep(Duration::from_secs(2));
    let last: Value = serde_json::from_str(&srv.cli_ok(&["ca", "status", "--json"])).unwrap();
    assert_eq!(last["root_fingerprint"], old_fp);
    assert_eq!(last["rotation"]["stage"], "idle");
}

#[test]
fn the_intermediate_renews_under_the_same_root() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let mut srv = Server::start(&d, &[]);
    let (_, bundle_before) = srv.curl("GET", "/v1/bundle", None, &[]);
    let issue = |srv: &Server, out: &str| {
        let dir = tmp.path().join(out);
        srv.cli_ok(&["issue", "web", "--out", p(&dir)]);
        split_pem(&std::fs::read_to_string(dir.join("tls.crt")).unwrap())
    };
    let first = issue(&srv, "w1");
    let out = srv.cli_ok(&["ca", "rotate", "intermediate"]);
    assert!(out.contains("renewed the intermediate"), "{out}");
    let second = issue(&srv, "w2");
    assert_ne!(
        first[1], second[1],
        "new leaves come from the new intermediate"
    );
    let (_, bundle_after) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(
        bundle_before, bundle_after,
        "the root, and so the bundle, stays"
    );
    let root = tmp.path().join("root.pem");
    std::fs::write(&root, &bundle_after).unwrap();
    for leaf in ["w1", "w2"] {
        tool(
            "openssl",
            &[
                "verify",
                "-CAfile",
                p(&root),
                "-untrusted",
                p(&tmp.path().join(leaf).join("tls.crt")),
                p(&tmp.path().join(leaf).join("tls.crt")),
            ],
        );
    }
    // A restart finds the renewed intermediate's key.
    let port = srv.port;
    srv.kill();
    let srv = Server::start_on(&d, port, &[]);
    let third = issue(&srv, "w3");
    assert_eq!(third[1], second[1]);
}

#[test]
fn prepare_can_adopt_an_existing_root() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let (crt, key) = crate::import::openssl_root(tmp.path(), "corp-root");
    let (other, _) = crate::import::openssl_root(tmp.path(), "other-root");
    // A key that is not the root's is refused by name; nothing is prepared.
    let out = srv.cli(&[
        "ca",
        "rotate",
        "prepare",
        "--import-root",
        &other,
        "--import-key",
        &key,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("root_key"), "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&srv.cli_ok(&["ca", "status", "--json"])).unwrap()["rotation"]
            ["stage"],
        "idle"
    );
    assert!(
        std::fs::read_dir(&d).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".import")),
        "the staged import files are gone"
    );
    srv.cli_ok(&[
        "ca",
        "rotate",
        "prepare",
        "--import-root",
        &crt,
        "--import-key",
        &key,
    ]);
    srv.cli_ok(&["ca", "rotate", "activate"]);
    let out = tmp.path().join("web");
    srv.cli_ok(&["issue", "web", "--out", p(&out)]);
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            &crt,
            "-untrusted",
            p(&out.join("tls.crt")),
            p(&out.join("tls.crt")),
        ],
    );
}
