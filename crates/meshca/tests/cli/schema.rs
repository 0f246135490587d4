//! API conformance: schemathesis (PyPI) generates requests from
//! `/v1/openapi.json` against a running `meshca serve` with the admin
//! certificate: no answer may be a 5xx and every answer must match the
//! document. Left out: `/v1/events` (a server-sent event stream does not
//! end, so there is no answer to check) and `/v1/ca/rotate/{step}` (random
//! steps would retire the root of the tester's own admin certificate; the
//! rotation tests drive it). The JUnit report is kept in
//! `target/tmp/schemathesis/`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;

#[test]
fn every_operation_answers_as_the_openapi_document_says() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let admin = d.join("admin");
    let reports = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    let out = Command::new("schemathesis")
        .args(["run", &format!("{}/v1/openapi.json", srv.url())])
        .arg("--request-cert")
        .arg(admin.join("tls.crt"))
        .arg("--request-cert-key")
        .arg(admin.join("tls.key"))
        .arg("--tls-verify")
        .arg(admin.join("ca.crt"))
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance",
            "--max-examples",
            "50",
            // A connection dropped by the loaded CI machine is tried again;
            // an answer is never retried away.
            "--request-retries",
            "2",
            "--exclude-path",
            "/v1/events",
            "--exclude-path",
            "/v1/ca/rotate/{step}",
            "--report",
            "junit",
            "--report-dir",
        ])
        .arg(&reports)
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .unwrap_or_else(|e| panic!("cannot run schemathesis (./test.sh installs it): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
    // The server kept serving through all of it.
    assert_eq!(srv.curl("GET", "/readyz", None, &[]).0, 200);
}
