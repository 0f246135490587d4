//! `meshca agent` against a real `meshca serve`: bootstrap, renewal at about
//! 2/3 of short lifetimes, hooks, restarts, the server away, rotation, and
//! the refusals.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::proxy::run_within;

/// A running agent (or the `sh` that runs one): ended, with everything it
/// started, when dropped, pass or fail.
fn start_agent(cmd: &mut Command) -> Child {
    spawn_cmd(cmd.stdin(Stdio::null()).stdout(Stdio::null()))
}

/// A `meshca agent --once` (or one expected to stop by itself), run to its
/// end within a minute; its output.
fn once(cmd: &mut Command) -> Output {
    let o = run_within(cmd, Duration::from_secs(60));
    keep_output("agent-stderr", &o.stderr);
    o
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
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
    // The agent listens for health once it holds its first certificate:
    // started again on another port when its port was taken meanwhile (the
    // token is spent by then; the restarted agent reuses the certificate).
    let (_agent, ports) = start_listening(
        1,
        &tmp.path().join("agent.log"),
        |ports| {
            let health = format!("127.0.0.1:{}", ports[0]);
            let mut cmd = agent_cmd(
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
            );
            cmd.stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    let health = format!("127.0.0.1:{}", ports[0]);
    wait_for("the first certificate", 10, || hook.exists());
    assert_eq!(mode(&out.join("tls.key")), 0o600);
    // One set: each name a link through `..data` to the set's directory
    // (the 0600 above is the real key's).
    assert!(
        std::fs::symlink_metadata(out.join("tls.key"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let set = std::fs::read_link(out.join("..data")).unwrap();
    assert!(set.to_string_lossy().starts_with("..set-"), "{set:?}");
    verify(&out);
    let first = serial_of(&out);
    let probe = tool(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            &format!("http://{health}/healthz"),
        ],
    );
    assert!(probe.starts_with("ok: serial"), "{probe}");
    let metrics = tool(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            &format!("http://{health}/metrics"),
        ],
    );
    assert!(
        metrics.contains("meshca_agent_certificate_expiry_seconds"),
        "{metrics}"
    );
    // Renewed, with a new key, and the hook run again. When: at 2/3 of the
    // lifetime, ±10% (meshca-agent's unit test of the schedule,
    // `renewal_is_at_two_thirds_within_the_jitter`); here only that it
    // comes, within a generous deadline.
    wait_for("a renewal", 60, || {
        std::fs::read_to_string(&hook).unwrap().lines().count() >= 2
    });
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
        let o = once(c);
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
        let o = once(c);
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
    let log = tmp.path().join("agent.log");
    let _agent = start_agent(
        agent_cmd(&srv, "web", &tok, &fp, &out, &["--ttl", "12s"])
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    wait_for("the first certificate", 10, || out.join("tls.crt").exists());
    let first = serial_of(&out);
    // The server goes away past the renewal point (8 s): the agent tries,
    // fails, says so, and keeps its files.
    srv.kill();
    wait_for(
        "the agent's failed renewal with the server away",
        30,
        || log_of(&log).contains("renewal failed"),
    );
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
    // The agent runs its hook after the first certificate and only then
    // opens its event stream: a hook that waits for the gate holds it
    // there, so that the rotate below is made after the certificate was
    // issued and before the stream is up, the moment a rotate used to be
    // lost in (the agent now opens its first stream from the last event
    // the server had seen when it issued the certificate).
    let (hooked, gate) = (tmp.path().join("hooked"), tmp.path().join("gate"));
    let hook = format!(
        ": > {}; while [ ! -e {} ]; do sleep 0.05; done",
        hooked.display(),
        gate.display()
    );
    // 60 s lifetime: the scheduled renewal (about 40 s) is far; rotate's
    // spread window is a tenth of the lifetime (6 s).
    let _agent = start_agent(
        agent_cmd(
            &srv,
            "web",
            &tok,
            &fp,
            &out,
            &["--ttl", "60s", "--on-rotate", &hook],
        )
        .stderr(kept_log("agent")),
    );
    wait_for("the hook after the first certificate", 10, || {
        hooked.exists()
    });
    let before = serial_of(&out);
    srv.cli_ok(&["rotate", "web"]);
    std::fs::write(&gate, "").unwrap();
    wait_for("a renewal asked for by rotate", 20, || {
        serial_of(&out) != before
    });
    verify(&out);
}

#[test]
fn a_rotate_made_while_the_agent_was_down_reaches_it_when_it_restarts() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let hooked = tmp.path().join("hooked");
    let hook = format!(": > {}", hooked.display());
    // 60 s lifetime: the scheduled renewal (about 40 s) is far; rotate's
    // spread is a tenth of the lifetime (6 s).
    let args = ["--ttl", "60s", "--on-rotate", hook.as_str()];
    let mut agent =
        start_agent(agent_cmd(&srv, "web", &tok, &fp, &out, &args).stderr(kept_log("agent")));
    wait_for("the first certificate", 10, || hooked.exists());
    // It kept the id of the last event before its certificate.
    let id = std::fs::read_to_string(out.join("events-from")).unwrap();
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "{id:?}"
    );
    agent.end();
    let before = serial_of(&out);
    srv.cli_ok(&["rotate", "web"]);
    // Restarted with its files (the token is spent): it resumes its event
    // stream from that id and so gets the rotate it missed.
    let _agent =
        start_agent(agent_cmd(&srv, "web", &tok, &fp, &out, &args).stderr(kept_log("agent")));
    wait_for("the renewal the missed rotate asked for", 20, || {
        serial_of(&out) != before
    });
    verify(&out);
}

/// Starts the agent again with its files (2 min lifetime: the schedule,
/// 68 s at the earliest, does not renew it here; a reset's spread is a
/// tenth of it, 12 s) and waits for the renewal a `reset` asks for.
fn restart_until_reset(srv: &Server, tok: &str, fp: &str, out: &Path, log: &Path, before: &str) {
    let _agent = start_agent(
        agent_cmd(srv, "web", tok, fp, out, &["--ttl", "2m"])
            .stderr(std::fs::File::create(log).unwrap()),
    );
    wait_for("the renewal the reset asked for", 45, || {
        serial_of(out) != before
    });
    let said = log_of(log);
    keep_output("agent", said.as_bytes());
    assert!(said.contains("missed events (reset: ring)"), "{said}");
    verify(out);
}

#[test]
fn an_agent_told_it_missed_events_fetches_again_and_renews() {
    let tmp = scratch();
    let data = tmp.path().join("data");
    init_with(&data, "", "events_per_identity = 3\n");
    let srv = Server::start(&data, &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let log = tmp.path().join("agent.log");
    // 2 min lifetime: the schedule (68 s at the earliest) does not renew it
    // below; the reset's spread is a tenth of it, 12 s.
    let args = ["--ttl", "2m"];
    let mut agent = start_agent(
        agent_cmd(&srv, "web", &tok, &fp, &out, &args).stderr(std::fs::File::create(&log).unwrap()),
    );
    wait_for("the first certificate", 10, || {
        out.join("events-from").exists()
    });
    agent.end();
    let before = serial_of(&out);
    // While it is away, more of its identity's events than its ring keeps
    // (certificates the admin issues for default/web: events it ignores).
    for _ in 0..5 {
        let (code, body) = srv.curl("POST", "/v1/issue", Some(r#"{"name":"web"}"#), &srv.admin());
        assert_eq!(code, 200, "{body}");
    }
    // Restarted with its files, it resumes from its id: the ring dropped
    // events after it, so the server says `reset`, and the agent renews.
    restart_until_reset(&srv, &tok, &fp, &out, &log, &before);
}

#[test]
fn a_meshca_tls_service_keeps_serving_across_five_renewals() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let hook = tmp.path().join("hook.log");
    let hook_cmd = format!("echo x >> {}", hook.display());
    let _agent = start_agent(
        agent_cmd(
            &srv,
            "web",
            &tok,
            &fp,
            &out,
            &["--ttl", "6s", "--on-rotate", &hook_cmd],
        )
        .stderr(kept_log("agent")),
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
    let changes = || std::fs::read_to_string(&hook).unwrap().lines().count();
    let (mut ok, mut failed) = (0, Vec::new());
    // The certificates (1 the first, 6 the fifth renewal's) that a request
    // was served with from start to end, to be sure the requests spanned
    // every one of them.
    let mut served_under = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while changes() < 6 {
        assert!(
            Instant::now() < deadline,
            "fewer than five renewals in 90 s"
        );
        let under = changes();
        let o = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "--max-time",
                "10",
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
            if changes() == under {
                served_under.insert(under);
            }
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
    assert!(
        (1..=5).all(|n| served_under.contains(&n)),
        "requests went through under certificates {served_under:?} of 1 to 5 only ({ok} requests)"
    );
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
        agents.push(start_agent(
            agent_cmd(
                &srv,
                &name,
                &tok,
                &fp,
                &out,
                &["--ttl", "60s", "--on-rotate", &hook],
            )
            .stderr(kept_log("agent")),
        ));
    }
    let hooks = |n: usize| {
        (0..50).all(|i| {
            std::fs::read_to_string(tmp.path().join(format!("svc{i}.hook")))
                .map_or(0, |t| t.lines().count())
                >= n
        })
    };
    wait_for("50 first certificates", 60, || hooks(1));
    // At once: an agent whose event stream is not up yet gets the rotate
    // when it opens it (from the event its certificate's answer named).
    srv.cli_ok(&["rotate", "--all"]);
    wait_for("50 renewals after rotate --all", 30, || hooks(2));
    let times: Vec<f64> = (0..50)
        .map(|i| {
            let t = std::fs::read_to_string(tmp.path().join(format!("svc{i}.hook"))).unwrap();
            t.lines().nth(1).unwrap().trim().parse().unwrap()
        })
        .collect();
    let spread = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    // The window is a tenth of the lifetime (6 s): renewals are spread, not
    // a stampede. (A property of the schedule, not a timing: a slow machine
    // spreads them further; 50 uniform draws over 6 s fall within 2 s of
    // each other with a probability below 1e-20.)
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
    let mut agent = start_agent(
        agent_cmd(&srv, "web", &tok, &fp, &out, &["--ttl", "4s"])
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    wait_for("the first certificate", 10, || out.join("tls.crt").exists());
    srv.kill();
    // With the server gone the files no longer change: the certificate
    // they hold expires meanwhile.
    let first = serial_of(&out);
    wait_past(validity(&out.join("tls.crt")).1);
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
    let o = once(&mut agent_cmd(&srv, "web", &tok2, &fp2, &out, &["--once"]));
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
    let (_s, ports) = start_listening(
        1,
        &ca.path("s_server.log"),
        |ports| {
            let mut cmd = Command::new("openssl");
            cmd.args([
                "s_server",
                "-quiet",
                "-accept",
                &ports[0].to_string(),
                "-www",
                "-cert",
                srv_dir.join("tls.crt").to_str().unwrap(),
                "-key",
                srv_dir.join("tls.key").to_str().unwrap(),
                "-cert_chain",
                srv_dir.join("tls.crt").to_str().unwrap(),
            ])
            .stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    let port = ports[0];
    let out = ca.path("web");
    let o = once(meshca().args([
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
    ]));
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
    let o = once(&mut agent_cmd(
        &srv,
        "web",
        &tok,
        &fp,
        &out,
        &["--once", "--ttl", "9s"],
    ));
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
    let _agent = start_agent(Command::new("sh").args(["-c", &script]));
    wait_for("a failed write", 15, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cannot write")
    });
    // The old set is whole: same certificate, its key, no temporary
    // entries: the five names, `..data` and the one directory it names.
    assert_eq!(serial_of(&out), first);
    verify(&out);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let sets: Vec<&String> = names.iter().filter(|n| n.starts_with("..set-")).collect();
    assert_eq!(sets.len(), 1, "{names:?}");
    assert_eq!(
        std::fs::read_link(out.join("..data")).unwrap(),
        Path::new(sets[0].as_str())
    );
    assert!(
        names.iter().all(|n| [
            "tls.crt",
            "tls.key",
            "ca.crt",
            "ca-custody.pem",
            "ca.crl",
            "events-from",
            "..data",
            "..lock",
            sets[0].as_str()
        ]
        .contains(&n.as_str())),
        "{names:?}"
    );
}

#[test]
fn an_agent_given_ca_file_trusts_that_bundle_and_no_other() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let agent_with = |name: &str, ca: &Path, out: &Path| {
        let (tok, _) = token(&srv, name, "1");
        let o = once(meshca().args([
            "agent",
            name,
            "--server",
            &srv.url(),
            "--ca",
            ca.to_str().unwrap(),
            "--token",
            &tok,
            "--out",
            out.to_str().unwrap(),
            "--once",
            "--ttl",
            "1h",
        ]));
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let uses = |name: &str| -> Value {
        let tokens: Value =
            serde_json::from_str(&srv.cli_ok(&["token", "list", "--json"])).unwrap();
        tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no token for {name}: {tokens}"))["uses"]
            .clone()
    };

    // The CA's own bundle (what the admin credentials hold): trusted, and
    // what the agent keeps as ca.crt.
    let bundle = srv.dir.join("admin/ca.crt");
    let web = tmp.path().join("web");
    let (ok, e) = agent_with("web", &bundle, &web);
    assert!(ok, "{e}");
    verify(&web);
    assert_eq!(
        std::fs::read(web.join("ca.crt")).unwrap(),
        std::fs::read(&bundle).unwrap()
    );
    assert_eq!(uses("web"), 1);

    // Another CA's bundle: the server's certificate does not verify, so
    // the token is never spent and nothing is written.
    let other = Ca::new(&[]);
    let db = tmp.path().join("db");
    let (ok, e) = agent_with("db", &other.dir.join("admin/ca.crt"), &db);
    assert!(!ok, "{e}");
    assert!(
        e.contains("cannot reach the meshca server")
            && e.contains("invalid peer certificate: UnknownIssuer"),
        "{e}"
    );
    assert!(!db.join("tls.crt").exists());
    assert!(std::fs::symlink_metadata(db.join("..data")).is_err());
    assert_eq!(uses("db"), 0);

    // A file that is not there: said, and no directory made.
    let missing = tmp.path().join("no-such-ca.crt");
    let api = tmp.path().join("api");
    let (ok, e) = agent_with("api", &missing, &api);
    assert!(!ok, "{e}");
    assert!(
        e.contains(&format!(
            "cannot read the CA file {}: No such file or directory",
            missing.display()
        )),
        "{e}"
    );
    assert!(!api.exists());
    assert_eq!(uses("api"), 0);
}

/// A service that reloads on SIGHUP: at each signal it appends the serial
/// of the certificate it then finds in `$1` to `$2`. Its trap is set before
/// it says it is ready (`$2.ready`).
const RELOADING_SERVICE: &str = r#"
trap 'openssl x509 -in "$1/tls.crt" -noout -serial >> "$2"' HUP
: > "$2.ready"
while :; do sleep 0.1; done
"#;

fn serials_in(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().trim_start_matches("serial=").to_lowercase())
        .collect()
}

#[test]
fn the_agent_signals_the_service_once_the_new_files_are_in_place() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let seen = tmp.path().join("seen");
    let script = tmp.path().join("service.sh");
    std::fs::write(&script, RELOADING_SERVICE).unwrap();
    let service = spawn_cmd(
        Command::new("sh")
            .arg(&script)
            .arg(&out)
            .arg(&seen)
            .stdin(Stdio::null()),
    );
    wait_for("the service's trap", 10, || {
        seen.with_extension("ready").exists()
    });
    let log = tmp.path().join("agent.log");
    let signal = format!("{}:HUP", service.id());
    let _agent = start_agent(
        agent_cmd(
            &srv,
            "web",
            &tok,
            &fp,
            &out,
            &["--ttl", "9s", "--signal", &signal],
        )
        .stderr(std::fs::File::create(&log).unwrap()),
    );
    let logged = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("signalled the service")
            .count()
    };
    // Each change: one signal, which the service handles with the new
    // files already there (the serial it reads is the one on disk).
    wait_for("the signal after the first certificate", 15, || {
        !serials_in(&seen).is_empty()
    });
    let first = serial_of(&out);
    assert_eq!(serials_in(&seen), std::slice::from_ref(&first));
    wait_for("the signal after the renewal", 20, || {
        serials_in(&seen).len() >= 2
    });
    let second = serial_of(&out);
    assert_ne!(second, first);
    assert_eq!(serials_in(&seen), [first, second]);
    verify(&out);
    wait_for("the agent to log both signals", 5, || logged() >= 2);
    let text = std::fs::read_to_string(&log).unwrap();
    keep_output("agent-stderr", text.as_bytes());
    assert_eq!(logged(), 2, "{text}");
}

#[test]
fn a_failing_on_rotate_hook_is_an_error_and_the_agent_goes_on() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (tok, fp) = token(&srv, "web", "1");
    let out = tmp.path().join("web");
    let ran = tmp.path().join("ran");
    let log = tmp.path().join("agent.log");
    // Records the serial it finds (it runs in --out), says something on
    // both streams, and fails.
    let hook = format!(
        "openssl x509 -in tls.crt -noout -serial >> {}; echo reload-out; echo reload-err >&2; exit 3",
        ran.display()
    );
    let mut agent = start_agent(
        agent_cmd(
            &srv,
            "web",
            &tok,
            &fp,
            &out,
            &["--ttl", "9s", "--on-rotate", &hook],
        )
        .stderr(std::fs::File::create(&log).unwrap()),
    );
    let failure = "the on-rotate hook failed (exit status: 3): stdout \"reload-out\", stderr \"reload-err\"; the new files are in place and the agent goes on";
    let failures = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(failure))
            .map(str::to_owned)
            .collect()
    };
    wait_for(
        "the hook to fail after the first certificate and after a renewal",
        25,
        || failures().len() >= 2,
    );
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent stopped over a failing hook"
    );
    // Once per change, not retried; each time with the new files in place.
    let runs = serials_in(&ran);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_ne!(runs[0], runs[1]);
    assert_eq!(runs[1], serial_of(&out));
    verify(&out);
    let text = std::fs::read_to_string(&log).unwrap();
    keep_output("agent-stderr", text.as_bytes());
    for line in failures() {
        assert!(line.contains("ERROR"), "{line}");
    }
    assert!(
        !text.contains("ran the on-rotate hook"),
        "a failure reported as a success: {text}"
    );
}
