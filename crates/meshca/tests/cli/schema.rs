//! API conformance: schemathesis (PyPI) generates requests from
//! `/v1/openapi.json` against a running `meshca serve` with the admin
//! certificate: no answer may be a 5xx and every answer must match the
//! document (status code, headers, content type and body schema), and every
//! request must get an answer: no retries, and a request schemathesis sent
//! again by itself after a dropped connection still fails the test. Left out:
//! `/v1/events` (a server-sent event stream does not end, so there is no
//! answer to check) and `/v1/ca/rotate/{step}` (random steps would retire
//! the root of the tester's own admin certificate; the rotation tests drive
//! it). The run's JSON and JUnit reports are read from a directory made for
//! this run; copies are kept in `target/tmp/schemathesis/`, replaced by every
//! run.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;

/// A schemathesis hook (loaded with `SCHEMATHESIS_HOOKS`). schemathesis
/// sends a request whose connection dropped before the answer once more by
/// itself, whatever `--request-retries` says, and counts an example that
/// failed and then passed on replay as passed: a server that drops
/// connections would pass. This records, at the one function that sends
/// requests, every request and every one that got no answer (a connection
/// error, reset, timeout or a body cut short), and writes them as JSON to
/// `$MESHCA_SCHEMATHESIS_TRANSPORT` when schemathesis exits. If that function
/// is not there (another schemathesis), loading the hook fails and so does
/// the run.
const TRANSPORT_HOOK: &str = r#"
import atexit, json, os, threading

import requests
import schemathesis.transport.requests as transport

_OUT = os.environ["MESHCA_SCHEMATHESIS_TRANSPORT"]
_LOCK = threading.Lock()
_SEEN = {"requests": 0, "unanswered": []}
_SEND = transport._request
_NO_ANSWER = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


def _request(session, data, *args, **kwargs):
    try:
        return _SEND(session, data, *args, **kwargs)
    except _NO_ANSWER as e:
        with _LOCK:
            _SEEN["unanswered"].append(
                f"{data.get('method')} {data.get('url')}: {type(e).__name__}: {e}"
            )
        raise
    finally:
        with _LOCK:
            _SEEN["requests"] += 1


transport._request = _request


@atexit.register
def _write():
    with _LOCK, open(_OUT, "w") as f:
        json.dump(_SEEN, f)
"#;

/// The checks run on every answer.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance";

/// The operations left out (see the module comment), one `--exclude-path` each.
const EXCLUDED: [&str; 2] = ["/v1/events", "/v1/ca/rotate/{step}"];

#[test]
fn every_operation_answers_as_the_openapi_document_says() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let admin = d.join("admin");
    // This run's directory: nothing in it predates the run. schemathesis runs
    // in it too, so no `schemathesis.toml` of the checkout applies.
    let run = tmp.path().join("schemathesis");
    std::fs::create_dir(&run).unwrap();
    let hook = run.join("meshca_transport_hook.py");
    std::fs::write(&hook, TRANSPORT_HOOK).unwrap();
    let transport = run.join("transport.json");
    let report = run.join("run.json");
    let junit = run.join("junit.xml");

    let mut cmd = Command::new("schemathesis");
    cmd.current_dir(&run)
        .args(["run", &format!("{}/v1/openapi.json", srv.url())])
        .arg("--request-cert")
        .arg(admin.join("tls.crt"))
        .arg("--request-cert-key")
        .arg(admin.join("tls.key"))
        .arg("--tls-verify")
        .arg(admin.join("ca.crt"))
        .args(["--checks", CHECKS, "--max-examples", "50"])
        // No retries: a dropped connection is a failure (0 is the default;
        // said here so no configuration can change it).
        .args(["--request-retries", "0"])
        // One connection per request: a server may close a kept-alive
        // connection after an answer without saying so (it does when it
        // did not read a body), and a request sent on it then gets no
        // answer through no fault of the server. Without keep-alive every
        // request that gets no answer was dropped by the server.
        .args(["--header", "Connection: close"]);
    for path in EXCLUDED {
        cmd.args(["--exclude-path", path]);
    }
    let out = cmd
        .args(["--report", "junit,json", "--report-json-path"])
        .arg(&report)
        .arg("--report-junit-path")
        .arg(&junit)
        .env("SCHEMATHESIS_HOOKS", &hook)
        .env("MESHCA_SCHEMATHESIS_TRANSPORT", &transport)
        .output()
        .unwrap_or_else(|e| panic!("cannot run schemathesis (./test.sh installs it): {e}"));
    let said = format!(
        "schemathesis ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    keep_reports(&[report.as_path(), junit.as_path()]);
    assert!(out.status.success(), "{said}");

    let r = read_json(&report, &said);
    let int = |pointer: &str| -> u64 {
        r.pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{}: no number at {pointer}: {r}", report.display()))
    };
    // The run ended as a run that found nothing ends.
    assert_eq!(r["exit_code"], 0, "report: {r}");
    assert_eq!(r["complete"], true, "report: {r}");
    assert_eq!(r["stop_reason"], "completed", "report: {r}");
    assert_eq!(r["failures"], serde_json::json!([]), "failures: {said}");
    assert_eq!(r["errors"], serde_json::json!([]), "errors: {said}");
    // Every operation but the excluded ones was tested, none errored.
    let total = int("/operations/total");
    let selected = int("/operations/selected");
    assert_eq!(
        selected + EXCLUDED.len() as u64,
        total,
        "the exclusions leave out exactly their operations: {}",
        r["operations"]
    );
    assert_eq!(int("/operations/tested"), selected, "{}", r["operations"]);
    assert_eq!(int("/operations/errored"), 0, "{}", r["operations"]);
    assert_eq!(int("/operations/skipped"), 0, "{}", r["operations"]);
    // Cases were generated and checked; none failed, errored or went unchecked.
    let generated = int("/test_cases/generated");
    assert!(generated >= selected, "{}", r["test_cases"]);
    for field in ["with_failures", "errored", "without_checks"] {
        assert_eq!(
            int(&format!("/test_cases/{field}")),
            0,
            "{field}: {}",
            r["test_cases"]
        );
    }
    // Generated tests ran: coverage and fuzzing always apply; no phase failed.
    let phases = r["phases"]
        .as_object()
        .unwrap_or_else(|| panic!("no phases: {r}"));
    for (name, phase) in phases {
        let status = phase["status"].as_str().unwrap_or_default();
        let must_run = name == "coverage" || name == "fuzzing";
        assert!(
            status == "success" || (!must_run && status == "skipped"),
            "phase {name}: {phase}"
        );
    }
    assert!(
        phases.contains_key("coverage") && phases.contains_key("fuzzing"),
        "phases: {}",
        r["phases"]
    );

    // Every request got an answer, retried or not.
    let t = read_json(&transport, &said);
    let sent = t["requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: {t}", transport.display()));
    assert!(
        sent >= generated,
        "the hook saw {sent} requests for {generated} cases: it was not on the path"
    );
    assert_eq!(
        t["unanswered"],
        serde_json::json!([]),
        "requests meshca dropped (schemathesis may have resent them and passed)"
    );

    // The server kept serving through all of it.
    assert_eq!(srv.curl("GET", "/readyz", None, &[]).0, 200);
}

/// A JSON file this run wrote.
fn read_json(path: &Path, said: &str) -> Value {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("{} was not written ({e}); {said}", path.display()));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}); {said}", path.display()))
}

/// Copies this run's reports to `target/tmp/schemathesis/` for people to
/// read, after removing what an earlier run left there.
fn keep_reports(reports: &[&Path]) {
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    match std::fs::remove_dir_all(&kept) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("{}: {e}", kept.display()),
    }
    std::fs::create_dir_all(&kept).unwrap();
    for r in reports {
        if let Some(name) = r.file_name() {
            // A report schemathesis did not write is reported by the checks
            // that read it.
            let _ = std::fs::copy(r, kept.join(name));
        }
    }
}
