//! Limits: what one caller may take of the CA (issuances per identity, uses
//! of a join token per second, open event streams, connections of the API
//! port), what the event log keeps per identity and how a client that
//! missed events is told (`reset`), paged listings, the redirect listener's
//! timeouts, and the pruning of superseded records.
//!
//! The settings are in the data directory's `meshca.toml` (written by
//! `meshca init`, edited here before `serve` starts): `keep_superseded` at
//! the top level, beside `keep_expired`, and the `[limits]` table
//! (`issuances_per_minute`, `token_uses_per_second`,
//! `event_streams_per_certificate`, `event_streams_per_identity`,
//! `max_connections`, `reserved_connections`, `events_per_identity`,
//! `events_shared`).
//!
//! A refusal by a limit is a 429 `rate_limited` whose message names the
//! setting (`limits.<key>`), with an integer `Retry-After` of at least one
//! second; nothing is consumed or stored; the audit log gets a `refused`
//! line whose reason starts with `limits.<key>`, at most one per limit and
//! caller per 10 s; `meshca_limited_total{limit="<key>"}` counts them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod connections;
mod listing;
mod rates;
mod streams;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;
use crate::refusal::api_error;

/// A data directory made by `meshca init` in `tmp/data` with these
/// settings (see [`init_with`]).
pub(super) fn data_dir(tmp: &Scratch, top: &str, limits: &str) -> PathBuf {
    let d = tmp.path().join("data");
    init_with(&d, top, limits);
    d
}

/// An API answer and its `Retry-After` header.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) code: u16,
    pub(super) body: String,
    pub(super) retry_after: Option<String>,
}

impl Answer {
    /// As `Server::curl` returns it.
    pub(super) fn pair(&self) -> (u16, String) {
        (self.code, self.body.clone())
    }
}

/// [`Server::curl`] that also reads the answer's `Retry-After` (curl's
/// `%header{}`) and gives up after `max_time` seconds: an event stream that
/// is served where it should have been refused is reported with its status
/// (200) once the time is up, instead of never.
pub(super) fn call(
    srv: &Server,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: &[String],
    max_time: u64,
) -> Answer {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-N", "--max-time", &max_time.to_string()])
        .args(["-o", "-", "-w", "\n%header{retry-after}\n%{http_code}"])
        .args(["-X", method, "--cacert"])
        .arg(srv.dir.join("admin/ca.crt"))
        .args(auth);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = cmd.arg(format!("{}{path}", srv.url())).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = text.rsplitn(3, '\n');
    let code = parts.next().unwrap_or_default().trim().parse().unwrap_or(0);
    let retry_after = parts.next().unwrap_or_default().trim().to_owned();
    let body = parts.next().unwrap_or_default().to_owned();
    if code >= 400 {
        keep_output("http-body", body.as_bytes());
    }
    Answer {
        code,
        body,
        retry_after: (!retry_after.is_empty()).then_some(retry_after),
    }
}

/// The answer's `Retry-After`: whole seconds, at least one.
#[track_caller]
pub(super) fn retry_after(a: &Answer, why: &str) -> u64 {
    let text = a
        .retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("{why}: no Retry-After: {} {}", a.code, a.body));
    let secs: u64 = text
        .parse()
        .unwrap_or_else(|_| panic!("{why}: Retry-After {text:?} is not whole seconds"));
    assert!(secs >= 1, "{why}: Retry-After {secs}");
    secs
}

/// A refusal by `limits.<key>`: 429 `rate_limited`, its message naming the
/// setting, and a `Retry-After`; returns that.
#[track_caller]
pub(super) fn assert_limited(a: &Answer, key: &str, why: &str) -> u64 {
    let message = api_error(&a.pair(), 429, "rate_limited", why);
    let setting = format!("limits.{key}");
    assert!(
        message.contains(&setting),
        "{why}: the message does not name {setting}: {message}"
    );
    retry_after(a, why)
}

/// The audit log's refusals by `limits.<key>` of `action` asked by `caller`.
pub(super) fn limit_refusals_audited(
    data: &Path,
    action: &str,
    caller: &str,
    key: &str,
) -> Vec<Value> {
    let setting = format!("limits.{key}");
    std::fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(json)
        .filter(|l| {
            l["action"] == action
                && l["caller"] == caller
                && l["outcome"] == "refused"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&setting))
        })
        .collect()
}

/// `refusals` refusals made within `took` left at least one audit line, and
/// at most one per 10 s: a flood does not flood the log.
#[track_caller]
pub(super) fn assert_audited_without_flood(
    lines: &[Value],
    refusals: usize,
    took: Duration,
    what: &str,
) {
    let most = refusals.min(1 + usize::try_from(took.as_secs() / 10).unwrap());
    assert!(
        !lines.is_empty() && lines.len() <= most,
        "{what}: {} audit lines for {refusals} refusals within {took:?}, expected 1 to {most}: {lines:?}",
        lines.len()
    );
}

/// `meshca_limited_total{limit="<key>"}` as anyone reads it on /metrics.
pub(super) fn limited_total(srv: &Server, key: &str) -> u64 {
    let (code, text) = srv.curl("GET", "/metrics", None, &[]);
    assert_eq!(code, 200, "{text}");
    let series = format!("meshca_limited_total{{limit=\"{key}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("/metrics has no {series}:\n{text}"))
}

/// The serials of the records of `identity` (`ns/name`), as the admin
/// lists them.
pub(super) fn serials_of(srv: &Server, identity: &str) -> Vec<String> {
    let (code, body) = srv.curl(
        "GET",
        &format!("/v1/certificates?identity={identity}"),
        None,
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
    json(&body)["certificates"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect()
}

/// The admin issues a certificate for `ns/name` (`extra`: more fields of
/// the body, `,"ttl":"1s"`); returns the answer.
pub(super) fn admin_issue(srv: &Server, ns: &str, name: &str, extra: &str) -> Value {
    let body = format!(r#"{{"name":"{name}","namespace":"{ns}"{extra}}}"#);
    let (code, text) = srv.curl("POST", "/v1/issue", Some(&body), &srv.admin());
    assert_eq!(code, 200, "{text}");
    json(&text)
}

/// A certificate for `ns/name` that the admin issues into `tmp/<out>` (a
/// kubernetes.io/tls directory: the workload's own credentials, for
/// `cert_args`); returns the directory and the serial. The admin's
/// issuances count against no limit.
pub(super) fn workload(
    srv: &Server,
    tmp: &Path,
    ns: &str,
    name: &str,
    out: &str,
) -> (PathBuf, String) {
    let dir = tmp.join(out);
    let answer = json(&srv.cli_ok(&[
        "issue",
        name,
        "--namespace",
        ns,
        "--out",
        dir.to_str().unwrap(),
        "--json",
    ]));
    (dir, answer["serial"].as_str().unwrap().to_owned())
}

#[track_caller]
pub(super) fn healthy(srv: &Server, when: &str) {
    let (code, body) = srv.curl("GET", "/healthz", None, &[]);
    assert_eq!(code, 200, "/healthz {when}: {body}");
}
