//! Clock skew, with the real binary under `faketime` (Debian): agents and
//! the server a few minutes off each other still get and use certificates
//! (notBefore is backdated by 5 minutes); an agent a day ahead detects its
//! certificate as expired and says what to do, and recovers when its clock
//! is right again.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

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
    // Started under faketime, in a process group of its own (ended with
    // faketime's child, the server, when dropped), and ready once it
    // answers /readyz over TLS with the certificate it made (so its admin
    // credentials exist too).
    let ahead_ca = Server::start_cmd(&ahead_dir, |port| {
        let mut cmd = Command::new("faketime");
        cmd.args(["-f", "+3m", env!("CARGO_BIN_EXE_meshca"), "serve", "--dir"])
            .arg(&ahead_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env_remove("MESHCA_DIR");
        cmd
    });
    let web = tmp.path().join("from-ahead");
    let o = ahead_ca.cli(&["issue", "web", "--out", web.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "a client on time could not use a CA three minutes ahead: {}",
        String::from_utf8_lossy(&o.stderr)
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
    drop(ahead_ca);

    // An agent a day ahead: its one-day certificate looks expired; without
    // a token it says so and what to do. Back on time, it goes on with the
    // certificate it has.
    let out = tmp.path().join("day");
    let tok = token(&srv, "day");
    let o = agent_once(&srv, None, "day", &tok, true, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let held = std::fs::read(out.join("tls.crt")).unwrap();
    // A day ahead is past this certificate's end (so that is what the agent
    // finds), and not past the CA's.
    let (_, not_after) = validity(&out.join("tls.crt"));
    let day_ahead = SystemTime::now() + Duration::from_secs(25 * 3600);
    assert!(
        SystemTime::now() < not_after && not_after < day_ahead,
        "the certificate's notAfter {not_after:?} is not within the next 25 hours"
    );
    let o = agent_once(&srv, Some("+25h"), "day", &tok, false, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    keep_output("agent-stderr", &o.stderr);
    let says = format!(
        "no valid certificate in {} and no --token: create one with `meshca token create day --namespace default`",
        out.display()
    );
    assert!(
        o.status.code() == Some(1) && err.contains(&says),
        "a day ahead: expected exit code 1 and {says:?}, got {:?}: {err}",
        o.status.code()
    );
    assert_eq!(
        std::fs::read(out.join("tls.crt")).unwrap(),
        held,
        "a day ahead, the agent changed the certificate it holds"
    );
    // Back on time, the certificate it holds is valid again: used, not
    // replaced (there is no token to replace it with).
    let o = agent_once(&srv, None, "day", &tok, false, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    keep_output("agent-stderr", &o.stderr);
    assert!(
        o.status.success() && err.contains("reusing the certificate already in"),
        "back on time: {err}"
    );
    assert_eq!(
        std::fs::read(out.join("tls.crt")).unwrap(),
        held,
        "back on time, the agent replaced its certificate"
    );
}
