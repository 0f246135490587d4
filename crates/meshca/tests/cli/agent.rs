//! `meshca agent` against a real `meshca serve`: bootstrap, renewal at about
//! 2/3 of short lifetimes, hooks, restarts, the server away, rotation, and
//! the refusals.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn token(srv: &Server, name: &str, uses: &str) -> (String, String) {
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", name, "--uses", uses, "--json"]))
            .unwrap();
    (
        v["token"].as_str().unwrap().to_owned(),
        v["ca_fingerprint"].as_str().unwrap().to_owned(),
    )
}

fn agent_cmd(srv: &Server, name: &str, tok: &str, fp: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = meshca();
    c.args([
        "agent",
        name,
        "--server",
        &srv.url(),
        "--token",
        tok,
        "--ca-fingerprint",
        fp,
        "--out",
        out.to_str().unwrap(),
    ])
    .args(extra);
    c
}

fn serial_of(dir: &Path) -> String {
    let s = tool(
        "openssl",
        &[
            "x509",
            "-in",
            dir.join("tls.crt").to_str().unwrap(),
            "-noout",
            "-serial",
        ],
    );
    s.trim().trim_start_matches("serial=").to_lowercase()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

fn verify(dir: &Path) {
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            dir.join("ca.crt").to_str().unwrap(),
            "-untrusted",
            dir.join("tls.crt").to_str().unwrap(),
            dir.join("tls.crt").to_str().unwrap(),
        ],
    );
    let key = tool(
        "openssl",
        &[
            "pkey",
            "-in",
            dir.join("tls.key").to_str().unwrap(),
            "-pubout",
        ],
    );
    let cert = tool(
        "openssl",
        &[
            "x509",
            "-in",
            dir.join("tls.crt").to_str().unwrap(),
            "-noout",
            "-pubkey",
        ],
    );
    assert_eq!(key, cert, "tls.key does not match tls.crt");
}

#[test]
fn agent_bootstraps_renews_and_runs_the_hook() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let hook = tmp.path().join("hook.log");
    let hook_cmd = format!(
        "openssl x509 -in tls.crt -noout -serial >> {}",
        hook.display()
    );
    let health = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let _agent = Agent(
        agent_cmd(
            &srv,
            "web",
            &tok,
            &fp,
            &out,
            &[
                "--ttl",
                "15s",
                "--on-rotate",
                &hook_cmd,
                "--health",
                &health,
            ],
        )
        .stderr(kept_log("agent"))
        .spawn()
        .unwrap(),
    );
    wait_for("the first certificate", 10, || hook.exists());
    assert_eq!(mode(&out.join("tls.key")), 0o600);
    verify(&out);
    let first = serial_of(&out);
    let probe = tool(
        "curl",
        &["-sS", "--fail", &format!("http://{health}/healthz")],
    );
    assert!(probe.starts_with("ok: serial"), "{probe}");
    let metrics = tool(
        "curl",
        &["-sS", "--fail", &format!("http://{health}/metrics")],
    );
    assert!(
        metrics.contains("meshca_agent_certificate_expiry_seconds"),
        "{metrics}"
    );
    // Renewed at about 2/3 of 15 s (10 s, ±1.5 s), with a new key, hook run again.
    wait_for("a renewal", 25, || {
        std::fs::read_to_string(&hook).unwrap().lines().count() >= 2
    });
    let at = started.elapsed();
    assert!(
        at > Duration::from_secs(7) && at < Duration::from_secs(16),
        "renewed after {at:?}"
    );
    let second = serial_of(&out);
    assert_ne!(first, second);
    verify(&out);
    // The token was single-use: every renewal was paid with the certificate.
    let tokens: Value = serde_json::from_str(&srv.cli_ok(&["token", "list", "--json"])).unwrap();
    assert_eq!(tokens[0]["uses"], 1);
}

#[test]
fn agent_refusals_are_clear() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("o");
    let run = |c: &mut Command| {
        let o = c.output().unwrap();
        keep_output("agent-stderr", &o.stderr);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let bad_fp = "ab".repeat(32);
    let e = run(&mut agent_cmd(
        &srv,
        "web",
        &tok,
        &bad_fp,
        &out,
        &["--once"],
    ));
    assert!(e.contains("refusing to talk") && e.contains(&bad_fp), "{e}");
    assert!(!out.exists(), "files written for an untrusted server");
    let e = run(&mut agent_cmd(
        &srv,
        "web",
        "mct_00.00",
        &fp,
        &out,
        &["--once"],
    ));
    assert!(e.contains("join token"), "{e}");
    let e = run(&mut agent_cmd(&srv, "db", &tok, &fp, &out, &["--once"]));
    assert!(e.contains("for default/web, not default/db"), "{e}");
    let e = run(meshca().args([
        "agent",
        "web",
        "--server",
        &srv.url(),
        "--out",
        out.to_str().unwrap(),
        "--once",
    ]));
    assert!(e.contains("never trusts a server on first use"), "{e}");
    std::fs::write(tmp.path().join("file"), "x").unwrap();
    let e = run(&mut agent_cmd(
        &srv,
        "web",
        &tok,
        &fp,
        &tmp.path().join("file"),
        &["--once"],
    ));
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn restarted_agent_reuses_its_certificate() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let ok = |c: &mut Command| {
        let o = c.output().unwrap();
        keep_output("agent-stderr", &o.stderr);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(&mut agent_cmd(
        &srv,
        "web",
        &tok,
        &fp,
        &out,
        &["--once", "--ttl", "1h"],
    ));
    let first = serial_of(&out);
    // The token is spent; a restart must not need it.
    ok(&mut agent_cmd(&srv, "web", &tok, &fp, &out, &["--once"]));
    assert_eq!(serial_of(&out), first);
}

#[test]
fn server_away_then_back_and_rotation_by_event() {
    let tmp = scratch();
    let data = tmp.path().join("data");
    let mut srv = Server::start(&data, &[]);
    let port = srv.port;
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let _agent = Agent(
        agent_cmd(&srv, "web", &tok, &fp, &out, &["--ttl", "12s"])
            .stderr(kept_log("agent"))
            .spawn()
            .unwrap(),
    );
    wait_for("the first certificate", 10, || out.join("tls.crt").exists());
    let first = serial_of(&out);
    // The server goes away for longer than the renewal point (8 s).
    srv.kill();
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(
        serial_of(&out),
        first,
        "files changed while the server was away"
    );
    verify(&out);
    let srv = Server::start_on(&data, port, &[]);
    wait_for("a renewal after the server came back", 30, || {
        serial_of(&out) != first
    });
    verify(&out);
    drop(srv);
}

#[test]
fn rotate_reaches_the_agent_through_events() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    // 60 s lifetime: the scheduled renewal (about 40 s) is far; rotate's
    // spread window is a tenth of the lifetime (6 s).
    let _agent = Agent(
        agent_cmd(&srv, "web", &tok, &fp, &out, &["--ttl", "60s"])
            .stderr(kept_log("agent"))
            .spawn()
            .unwrap(),
    );
    wait_for("the first certificate", 10, || out.join("tls.crt").exists());
    let before = serial_of(&out);
    std::thread::sleep(Duration::from_secs(1)); // the agent opens its event stream
    srv.cli_ok(&["rotate", "web"]);
    wait_for("a renewal asked for by rotate", 10, || {
        serial_of(&out) != before
    });
    verify(&out);
}

#[test]
fn a_meshca_tls_service_keeps_serving_across_five_renewals() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let hook = tmp.path().join("hook.log");
    let hook_cmd = format!("echo x >> {}", hook.display());
    let _agent = Agent(
        agent_cmd(
            &srv,
            "web",
            &tok,
            &fp,
            &out,
            &["--ttl", "6s", "--on-rotate", &hook_cmd],
        )
        .stderr(kept_log("agent"))
        .spawn()
        .unwrap(),
    );
    wait_for("the first certificate", 10, || hook.exists());
    // The default policy allows no extra DNS name for a workload: the service
    // is reached by its own name, web.default.svc, resolved to 127.0.0.1.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = rt.block_on(async {
        let config = meshca_tls::TlsConfig {
            mode: meshca_tls::TlsMode::Tls,
            certs: Some(out.clone()),
            ..Default::default()
        };
        let acceptor = std::sync::Arc::new(meshca_tls::TlsAcceptor::new(&config).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(meshca_tls::serve(listener, acceptor, app));
        port
    });
    let host = "web.default.svc";
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    let (mut ok, mut failed) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(40);
    while std::fs::read_to_string(&hook).unwrap().lines().count() < 6 {
        assert!(
            Instant::now() < deadline,
            "fewer than five renewals in 40 s"
        );
        let o = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "--resolve",
                &resolve,
                "--cacert",
                out.join("ca.crt").to_str().unwrap(),
                &url,
            ])
            .output()
            .unwrap();
        keep_output("agent-stderr", &o.stderr);
        if o.status.success() {
            ok += 1;
        } else {
            failed.push(String::from_utf8_lossy(&o.stderr).into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the renewals: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
    assert!(ok > 50, "only {ok} requests");
    drop(rt);
}

#[test]
fn rotate_all_renews_fifty_agents_spread_over_the_window() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let mut agents = Vec::new();
    for i in 0..50 {
        let name = format!("svc{i}");
        let (tok, fp) = token(&srv, &name, "1");
        let out = tmp.path().join(&name);
        let hook = format!(
            "date +%s.%N >> {}",
            tmp.path().join(format!("{name}.hook")).display()
        );
        agents.push(Agent(
            agent_cmd(
                &srv,
                &name,
                &tok,
                &fp,
                &out,
                &["--ttl", "60s", "--on-rotate", &hook],
            )
            .stderr(kept_log("agent"))
            .spawn()
            .unwrap(),
        ));
    }
    let hooks = |n: usize| {
        (0..50).all(|i| {
            std::fs::read_to_string(tmp.path().join(format!("svc{i}.hook")))
                .map_or(0, |t| t.lines().count())
                >= n
        })
    };
    wait_for("50 first certificates", 30, || hooks(1));
    std::thread::sleep(Duration::from_secs(2)); // event streams open
    srv.cli_ok(&["rotate", "--all"]);
    wait_for("50 renewals after rotate --all", 20, || hooks(2));
    let times: Vec<f64> = (0..50)
        .map(|i| {
            let t = std::fs::read_to_string(tmp.path().join(format!("svc{i}.hook"))).unwrap();
            t.lines().nth(1).unwrap().trim().parse().unwrap()
        })
        .collect();
    let spread = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    // The window is a tenth of the lifetime (6 s): renewals are spread, not a stampede.
    assert!(spread > 2.0, "renewals within {spread:.2}s of each other");
    drop(agents);
}

#[test]
fn expired_while_away_needs_a_new_token() {
    let tmp = scratch();
    let data = tmp.path().join("data");
    let mut srv = Server::start(&data, &[]);
    let port = srv.port;
    let (tok, fp) = token(&srv, "web", "2");
    let out = tmp.path().join("web");
    let log = tmp.path().join("agent.log");
    let mut agent = Agent(
        agent_cmd(&srv, "web", &tok, &fp, &out, &["--ttl", "4s"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the first certificate", 10, || out.join("tls.crt").exists());
    let first = serial_of(&out);
    srv.kill();
    std::thread::sleep(Duration::from_secs(6)); // the certificate expires meanwhile
    let srv = Server::start_on(&data, port, &[]);
    // The agent dropped its token once it held a certificate (the token
    // had a use left): it says what to do and stops.
    wait_for("the agent to stop", 60, || {
        agent.0.try_wait().unwrap().is_some()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    keep_output("agent-stderr", text.as_bytes());
    assert!(
        text.contains("create a new one with `meshca token create web"),
        "{text}"
    );
    assert_eq!(serial_of(&out), first);
    // Restarted with a new token, it recovers.
    let (tok2, fp2) = token(&srv, "web", "1");
    let o = agent_cmd(&srv, "web", &tok2, &fp2, &out, &["--once"])
        .output()
        .unwrap();
    keep_output("agent-stderr", &o.stderr);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(serial_of(&out), first);
    verify(&out);
}

#[test]
fn a_server_answering_garbage_is_refused_clearly() {
    // A real TLS server (openssl s_server -www) that answers every request
    // with an HTML page: not the meshca API. The agent, pinning our CA's
    // fingerprint, gets HTML instead of a bundle and refuses to go on.
    let ca = Ca::new(&[]);
    let srv_dir = ca.issue("imposter", "imp", &["--profile", "server"]);
    let fp = tool(
        "openssl",
        &[
            "x509",
            "-in",
            srv_dir.join("ca.crt").to_str().unwrap(),
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    );
    let fp = fp
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    let port = free_port();
    let _s = spawn(
        "openssl",
        &[
            "s_server",
            "-quiet",
            "-accept",
            &port.to_string(),
            "-www",
            "-cert",
            srv_dir.join("tls.crt").to_str().unwrap(),
            "-key",
            srv_dir.join("tls.key").to_str().unwrap(),
            "-cert_chain",
            srv_dir.join("tls.crt").to_str().unwrap(),
        ],
    );
    wait_for_port(port);
    let out = ca.path("web");
    let o = meshca()
        .args([
            "agent",
            "web",
            "--server",
            &format!("https://localhost:{port}"),
            "--token",
            "mct_00.11",
            "--ca-fingerprint",
            &fp,
            "--out",
            out.to_str().unwrap(),
            "--once",
        ])
        .output()
        .unwrap();
    keep_output("agent-stderr", &o.stderr);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("refusing to talk to the server"), "{e}");
    assert!(!out.join("tls.crt").exists());
}

#[test]
fn a_full_disk_leaves_the_old_pair_intact() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let o = agent_cmd(&srv, "web", &tok, &fp, &out, &["--once", "--ttl", "9s"])
        .output()
        .unwrap();
    keep_output("agent-stderr", &o.stderr);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = serial_of(&out);
    // Restart the agent where no file may grow past 1 KiB (as on a full disk):
    // the key (about 240 bytes) would fit, the certificate (about 1.6 KiB) not.
    let log = tmp.path().join("agent.log");
    let script = format!(
        "trap '' XFSZ; ulimit -f 1; exec {} agent web --server {} --token {tok} --ca-fingerprint {fp} --out {} 2>{}",
        env!("CARGO_BIN_EXE_meshca"),
        srv.url(),
        out.display(),
        log.display()
    );
    let _agent = Agent(Command::new("sh").args(["-c", &script]).spawn().unwrap());
    wait_for("a failed write", 15, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cannot write")
    });
    // The old pair is whole: same certificate, its key, no temporary files.
    assert_eq!(serial_of(&out), first);
    verify(&out);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(
            |n| ["tls.crt", "tls.key", "ca.crt", "ca-custody.pem", "ca.crl"].contains(&n.as_str())
        ),
        "{names:?}"
    );
}
