//! Refusals asserted as what they are, never as "something failed": the
//! TLS alert the client was sent (its name and number as OpenSSL reports
//! them), or the HTTP status with the API's `error.code`; and the server
//! still serving afterwards (a crashed server fails every request, so "the
//! request failed" alone would pass).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::Server;

/// When a server sends an alert, which decides how a client can be sure to
/// read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// During the handshake, before the client has finished its side:
    /// nothing of the client's request has gone out, and curl reports the
    /// alert every time, with its exit code 35 ("SSL connect error").
    InHandshake,
    /// After the client's Finished: TLS 1.3 servers verify the client's
    /// certificate then. curl has sent its request by the time the alert
    /// comes, and a server that closes with that request unread makes its
    /// kernel answer with a reset, which can discard the alert before curl
    /// reads it: against `meshca serve`, curl then reports "getpeername()
    /// failed with errno 107" (exit code 55) about 60% of the time instead
    /// of the alert (56). `openssl s_client -ign_eof` with nothing to send
    /// reads the alert every time.
    AfterClientFinished,
}

/// A TLS alert: its number (RFC 8446, section 6), OpenSSL's name for it,
/// and when the server sends it.
#[derive(Clone, Copy, Debug)]
pub struct Alert {
    pub number: u8,
    pub text: &'static str,
    pub sent: Sent,
}

/// No client certificate (rustls: `NoCertificatesPresented`).
pub const CERTIFICATE_REQUIRED: Alert = Alert {
    number: 116,
    text: "tlsv13 alert certificate required",
    sent: Sent::AfterClientFinished,
};
/// A valid certificate outside the allow-list (rustls:
/// `ApplicationVerificationFailure`).
pub const ACCESS_DENIED: Alert = Alert {
    number: 49,
    text: "tlsv1 alert access denied",
    sent: Sent::AfterClientFinished,
};
/// A certificate of another CA (rustls: `UnknownIssuer`).
pub const UNKNOWN_CA: Alert = Alert {
    number: 48,
    text: "tlsv1 alert unknown ca",
    sent: Sent::AfterClientFinished,
};
/// A certificate past its notAfter or before its notBefore (rustls maps
/// both to `certificate_expired`).
pub const CERTIFICATE_EXPIRED: Alert = Alert {
    number: 45,
    text: "sslv3 alert certificate expired",
    sent: Sent::AfterClientFinished,
};
/// A protocol version the server does not speak (TLS 1.2 to a TLS 1.3 port).
pub const PROTOCOL_VERSION: Alert = Alert {
    number: 70,
    text: "tlsv1 alert protocol version",
    sent: Sent::InHandshake,
};
/// No cipher suite in common.
pub const HANDSHAKE_FAILURE: Alert = Alert {
    number: 40,
    text: "sslv3 alert handshake failure",
    sent: Sent::InHandshake,
};

/// Requires that a client calling `url` with the curl arguments `args` is
/// refused with `alert`; returns what the client printed. An alert sent
/// during the handshake is read by `curl -sS --max-time 10 ARGS URL`: its
/// exit code 35, the alert named in its message, and nothing served. One
/// sent after the client's Finished ([`Sent::AfterClientFinished`]) is read
/// by `openssl s_client` with the same credentials, sending nothing (see
/// [`Sent`] for why curl cannot be relied on to see it): openssl's failure,
/// the alert's name and number.
#[track_caller]
pub fn curl_alert<S: AsRef<OsStr>>(url: &str, args: &[S], alert: Alert, why: &str) -> String {
    match alert.sent {
        Sent::InHandshake => curl_refused(url, args, alert, why),
        Sent::AfterClientFinished => s_client_refused(url, args, alert, why),
    }
}

#[track_caller]
fn curl_refused<S: AsRef<OsStr>>(url: &str, args: &[S], alert: Alert, why: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.code() == Some(35) && stderr.contains(alert.text),
        "{why}: expected curl's exit code 35 and {:?}; got {:?}: {stderr}{stdout}",
        alert.text,
        out.status.code()
    );
    assert!(
        stdout.is_empty(),
        "{why}: refused with {:?}, yet something was served: {stdout}",
        alert.text
    );
    stderr
}

/// `host` and `port` of an `https://host:port/...` URL.
fn host_port(url: &str) -> (String, u16) {
    let rest = url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("not an https URL: {url}"));
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {url}"));
    let port = port
        .parse()
        .unwrap_or_else(|e| panic!("port of {url}: {e}"));
    (host.to_owned(), port)
}

/// The `openssl s_client` arguments for curl's `args`: its trust, its
/// credentials (the whole chain of `--cert`, as curl sends it), and
/// nothing of the request (which is never sent: the refusal comes first).
fn s_client_args<S: AsRef<OsStr>>(args: &[S]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter().map(|a| a.as_ref().to_str().unwrap().to_owned());
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("curl_alert: {arg} without a value"))
        };
        match arg.as_str() {
            "--cacert" => out.extend(["-CAfile".to_owned(), value()]),
            "--cert" => {
                let cert = value();
                out.extend([
                    "-cert".to_owned(),
                    cert.clone(),
                    "-cert_chain".to_owned(),
                    cert,
                ]);
            }
            "--key" => out.extend(["-key".to_owned(), value()]),
            "-H" | "--header" | "-d" | "--data" | "--data-binary" | "-X" | "--request" => {
                let _ = value();
            }
            "-v" | "--verbose" => {}
            other => panic!(
                "curl_alert: {other} has no openssl s_client equivalent here; add it to s_client_args"
            ),
        }
    }
    out
}

#[track_caller]
fn s_client_refused<S: AsRef<OsStr>>(url: &str, args: &[S], alert: Alert, why: &str) -> String {
    let (host, port) = host_port(url);
    // The servers listen on 127.0.0.1 only (curl tries ::1 first and moves on).
    let ip = if host == "localhost" {
        "127.0.0.1"
    } else {
        host.as_str()
    };
    let out = Command::new("timeout")
        .args(["20", "openssl", "s_client", "-connect"])
        .arg(format!("{ip}:{port}"))
        .args([
            "-servername",
            host.as_str(),
            "-verify_return_error",
            "-ign_eof",
        ])
        .args(s_client_args(args))
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // 1: openssl's failure (124 would be timeout's: no answer at all; 0 a
    // connection the server kept).
    let number = format!("SSL alert number {}", alert.number);
    assert!(
        out.status.code() == Some(1) && stderr.contains(alert.text) && stderr.contains(&number),
        "{why}: expected openssl s_client to fail with {:?} ({number}); got {:?}: {stderr}{stdout}",
        alert.text,
        out.status.code()
    );
    stderr
}

/// An API refusal, `(status, body)` as `Server::curl` returns it: exactly
/// `status` and `error.code`, and a message. Returns the message.
#[track_caller]
pub fn api_error(got: &(u16, String), status: u16, code: &str, why: &str) -> String {
    let (got_status, body) = got;
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        *got_status == status && v["error"]["code"].as_str() == Some(code) && !message.is_empty(),
        "{why}: expected {status} with error.code {code:?} and a message, got {got_status}: {body}"
    );
    message.to_owned()
}

/// The server still answers (the trust bundle, no authentication): the
/// refusals before did not take it down.
#[track_caller]
pub fn still_serving(srv: &Server, why: &str) {
    let (code, body) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert!(
        code == 200 && body.contains("BEGIN CERTIFICATE"),
        "{why}: the server no longer serves: {code} {body}"
    );
}
