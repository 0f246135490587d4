//! Clock skew, with the real binary under `faketime` (Debian): agents and
//! the server a few minutes off each other still get and use certificates
//! (notBefore is backdated by 5 minutes); an agent a day ahead detects its
//! certificate as expired and says what to do, and recovers when its clock
//! is right again.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::*;

/// `meshca ARGS` under `faketime OFFSET` (monotonic clocks left alone, so
/// timers and timeouts behave).
fn skewed(offset: Option<&str>, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_meshca");
    let mut cmd = match offset {
        Some(o) => {
            let mut c = Command::new("faketime");
            c.args(["-f", o, bin]);
            c
        }
        None => Command::new(bin),
    };
    cmd.env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env_remove("MESHCA_DIR")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run faketime (./test.sh installs it): {e}"))
}

fn token(srv: &Server, name: &str) -> (String, String) {
    let v: Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", name, "--uses", "3", "--json"]))
            .unwrap();
    (
        v["token"].as_str().unwrap().to_owned(),
        v["ca_fingerprint"].as_str().unwrap().to_owned(),
    )
}

/// `meshca agent --once`, pinned to the CA by `tok.1`; with the token
/// `tok.0` when `with_token`.
fn agent_once(
    srv: &Server,
    offset: Option<&str>,
    name: &str,
    tok: &(String, String),
    with_token: bool,
    out: &Path,
) -> Output {
    let url = srv.url();
    let mut args = vec![
        "agent",
        name,
        "--server",
        &url,
        "--out",
        out.to_str().unwrap(),
        "--once",
        "--ca-fingerprint",
        tok.1.as_str(),
    ];
    if with_token {
        args.extend(["--token", tok.0.as_str()]);
    }
    skewed(offset, &args)
}

#[test]
fn clocks_minutes_apart_still_work_and_a_day_ahead_is_detected() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);

    // Agents three minutes behind and ahead of the CA.
    for (name, offset) in [("behind", "-3m"), ("ahead", "+3m")] {
        let out = tmp.path().join(name);
        let tok = token(&srv, name);
        let o = agent_once(&srv, Some(offset), name, &tok, true, &out);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // What it installed verifies now, too.
        tool(
            "openssl",
            &[
                "verify",
                "-CAfile",
                out.join("ca.crt").to_str().unwrap(),
                "-untrusted",
                out.join("tls.crt").to_str().unwrap(),
                out.join("tls.crt").to_str().unwrap(),
            ],
        );
    }

    // A CA three minutes ahead of its clients: what it issues is already
    // valid for them (notBefore backdated).
    let ahead_dir = tmp.path().join("ahead-ca");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut ahead_ca = Child(
        Command::new("faketime")
            .args([
                "-f",
                "+3m",
                env!("CARGO_BIN_EXE_meshca"),
                "serve",
                "--dir",
                ahead_dir.to_str().unwrap(),
                "--listen",
                &listen,
            ])
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdout(std::process::Stdio::null())
            .stderr(kept_log("skew"))
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let web = tmp.path().join("from-ahead");
    let mut ok = false;
    for _ in 0..50 {
        let o = meshca()
            .args([
                "--server",
                &format!("https://localhost:{port}"),
                "--dir",
                ahead_dir.to_str().unwrap(),
                "issue",
                "web",
                "--out",
                web.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        if o.status.success() {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        ok,
        "a client on time could not use a CA three minutes ahead"
    );
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
    let _ = ahead_ca.0.kill();

    // An agent a day ahead: its one-day certificate looks expired; without
    // a token it says so and what to do. Back on time, it goes on with the
    // certificate it has.
    let out = tmp.path().join("day");
    let tok = token(&srv, "day");
    let o = agent_once(&srv, None, "day", &tok, true, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = agent_once(&srv, Some("+25h"), "day", &tok, false, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("token"),
        "a day ahead: {err}"
    );
    let o = agent_once(&srv, None, "day", &tok, false, &out);
    assert!(
        o.status.success(),
        "back on time: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
