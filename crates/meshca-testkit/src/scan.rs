//! TLS scanners against a listener: sslscan (Debian) and sslyze (PyPI),
//! their reports saved, the findings read back for assertions.
//!
//! Each scan writes into a directory made for it (nothing in it predates the
//! scan, and it is removed afterwards); only what this scan wrote is read.
//! A scanner that fails, cannot connect, or leaves a check undone fails the
//! scan, naming what is missing: neither scanner's exit status says enough
//! by itself (both exit 0 when they cannot reach the server, and sslyze
//! exits 0 when its command line is refused), so the reports are checked
//! too. Copies of the reports are kept in the caller's `reports` directory
//! for people to read, replaced by every scan.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use serde_json::Value;

/// What the two scanners found.
#[derive(Debug, Clone)]
pub struct TlsScan {
    /// Protocol versions sslscan found enabled (`TLSv1.3`, ...).
    pub sslscan_protocols: Vec<String>,
    /// Protocol versions sslyze found supported (SSLv2 to TLSv1.3, each
    /// scan completed).
    pub sslyze_protocols: Vec<String>,
    /// Whether sslscan found renegotiation supported.
    pub sslscan_renegotiation: bool,
    /// Client-initiated renegotiations sslyze got through.
    pub sslyze_renegotiations: u64,
    /// Whether sslyze found TLS compression.
    pub compression: bool,
    /// Key exchange groups sslyze got accepted.
    pub groups: Vec<String>,
    /// Whether sslyze validated every certificate deployment's chain
    /// against the given CA (and host).
    pub chain_valid: bool,
    /// The saved copies of the reports.
    pub reports: Vec<PathBuf>,
}

/// sslyze's scan commands this module reads, and where each one's result
/// is in its JSON report.
const SSLYZE_COMMANDS: [(&str, &str); 10] = [
    ("--certinfo", "certificate_info"),
    ("--sslv2", "ssl_2_0_cipher_suites"),
    ("--sslv3", "ssl_3_0_cipher_suites"),
    ("--tlsv1", "tls_1_0_cipher_suites"),
    ("--tlsv1_1", "tls_1_1_cipher_suites"),
    ("--tlsv1_2", "tls_1_2_cipher_suites"),
    ("--tlsv1_3", "tls_1_3_cipher_suites"),
    ("--compression", "tls_compression"),
    ("--reneg", "session_renegotiation"),
    ("--elliptic_curves", "elliptic_curves"),
];

/// The protocol versions, as both scanners' results name them.
const PROTOCOLS: [(&str, &str, &str); 6] = [
    // (name, sslscan's line, sslyze's result)
    ("SSLv2", "SSLv2", "ssl_2_0_cipher_suites"),
    ("SSLv3", "SSLv3", "ssl_3_0_cipher_suites"),
    ("TLSv1.0", "TLSv1.0", "tls_1_0_cipher_suites"),
    ("TLSv1.1", "TLSv1.1", "tls_1_1_cipher_suites"),
    ("TLSv1.2", "TLSv1.2", "tls_1_2_cipher_suites"),
    ("TLSv1.3", "TLSv1.3", "tls_1_3_cipher_suites"),
];

/// Scans `127.0.0.1:port` as `host` (SNI and name checks) with both
/// scanners, trusting `ca` and presenting `client` (cert, key) when given;
/// keeps copies of the reports as `<name>.sslscan.txt`, `<name>.sslyze.json`
/// and `<name>.sslyze-sslv2.json` in `reports`.
///
/// Panics, saying why, when a scanner fails or its report is not complete
/// evidence about this server.
pub fn scan_tls(
    host: &str,
    port: u16,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    reports: &Path,
    name: &str,
) -> TlsScan {
    std::fs::create_dir_all(reports).unwrap_or_else(|e| panic!("{}: {e}", reports.display()));
    let kept = [
        reports.join(format!("{name}.sslscan.txt")),
        reports.join(format!("{name}.sslyze.json")),
        reports.join(format!("{name}.sslyze-sslv2.json")),
    ];
    // An older scan's copies go first, so none is mistaken for this one's.
    for k in &kept {
        match std::fs::remove_file(k) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", k.display()),
        }
    }
    let fresh = tempfile::Builder::new()
        .prefix(&format!("tls-scan-{name}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("a directory for this scan's reports: {e}"));

    let text = sslscan(host, port, client);
    write(&kept[0], text.as_bytes());
    let found = read_sslscan(&text, host, port);

    // Everything but SSLv2, with the client's whole chain.
    let main: Vec<&str> = SSLYZE_COMMANDS
        .iter()
        .map(|(flag, _)| *flag)
        .filter(|f| *f != "--sslv2")
        .collect();
    let (bytes, v) = sslyze(
        fresh.path(),
        "sslyze.json",
        host,
        port,
        Some(ca),
        client,
        &main,
    );
    write(&kept[1], &bytes);
    // SSLv2 alone: sslyze's SSLv2 client (OpenSSL 1.0.2's SSLv2 method)
    // cannot take extra chain certificates, so with a chain file that scan
    // fails (`BUG_IN_SSLYZE`, once read as "SSLv2 not supported"). An SSLv2
    // ClientHello is refused before any certificate is asked for, so the
    // leaf alone is enough.
    let leaf = fresh.path().join("client-leaf.crt");
    let client_leaf = client.map(|(cert, key)| {
        write(&leaf, first_pem_cert(cert).as_bytes());
        (leaf.as_path(), key)
    });
    let (bytes2, v2) = sslyze(
        fresh.path(),
        "sslyze-sslv2.json",
        host,
        port,
        None,
        client_leaf,
        &["--sslv2"],
    );
    write(&kept[2], &bytes2);

    let result = |key: &str| result_of(&v, &v2, key);
    let mut sslyze_protocols = Vec::new();
    for (p, _, key) in PROTOCOLS {
        let r = result(key);
        let supported = bool_at(r, "/is_tls_version_supported");
        let accepted = at(r, "/accepted_cipher_suites")
            .as_array()
            .unwrap_or_else(|| {
                panic!(
                    "sslyze {key}: accepted_cipher_suites is not a list: {}",
                    brief(r)
                )
            });
        assert_eq!(
            supported,
            !accepted.is_empty(),
            "sslyze {key}: supported, but no cipher suite accepted (or the reverse): {}",
            brief(r)
        );
        if supported {
            sslyze_protocols.push(p.to_owned());
        }
    }
    let curves = result("elliptic_curves");
    let groups = at(curves, "/supported_curves")
        .as_array()
        .unwrap_or_else(|| panic!("sslyze: supported_curves is not a list: {}", brief(curves)))
        .iter()
        .map(|c| str_at(c, "/name").to_owned())
        .collect();
    let certinfo = result("certificate_info");
    let deployments = at(certinfo, "/certificate_deployments")
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "sslyze: certificate_deployments is not a list: {}",
                brief(certinfo)
            )
        });
    assert!(
        !deployments.is_empty(),
        "sslyze found no certificate: {}",
        brief(certinfo)
    );
    let chain_valid = deployments.iter().all(|d| {
        let results = at(d, "/path_validation_results")
            .as_array()
            .unwrap_or_else(|| {
                panic!(
                    "sslyze: path_validation_results is not a list: {}",
                    brief(d)
                )
            });
        let supplied = results
            .iter()
            .find(|p| same_file(str_at(p, "/trust_store/path"), ca))
            .unwrap_or_else(|| {
                panic!(
                    "sslyze did not validate against {}: {}",
                    ca.display(),
                    brief(at(d, "/path_validation_results"))
                )
            });
        bool_at(supplied, "/was_validation_successful")
    });
    let reneg = result("session_renegotiation");
    TlsScan {
        sslscan_protocols: found.protocols,
        sslyze_protocols,
        sslscan_renegotiation: found.renegotiation,
        sslyze_renegotiations: at(reneg, "/client_renegotiations_success_count")
            .as_u64()
            .unwrap_or_else(|| panic!("sslyze: no renegotiation count: {}", brief(reneg))),
        compression: bool_at(result("tls_compression"), "/supports_compression"),
        groups,
        chain_valid,
        reports: kept.to_vec(),
    }
}

/// The result of one sslyze command: SSLv2's from its own run.
fn result_of<'a>(main: &'a Value, sslv2: &'a Value, key: &str) -> &'a Value {
    let v = if key == "ssl_2_0_cipher_suites" {
        sslv2
    } else {
        main
    };
    at(
        v,
        &format!("/server_scan_results/0/scan_result/{key}/result"),
    )
}

/// What sslscan's text says.
struct Sslscan {
    protocols: Vec<String>,
    renegotiation: bool,
}

/// Runs sslscan and returns its text, which must come from a completed run.
fn sslscan(host: &str, port: u16, client: Option<(&Path, &Path)>) -> String {
    let mut cmd = Command::new("sslscan");
    cmd.args(["--no-colour", &format!("--sni-name={host}")]);
    if let Some((cert, key)) = client {
        cmd.arg(format!("--certs={}", cert.display()))
            .arg(format!("--pk={}", key.display()));
    }
    let out = cmd
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run sslscan (./test.sh installs it): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sslscan failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // sslscan exits 0 and still prints "disabled" and "not supported" when
    // it cannot connect or cannot load the client key: its own complaints
    // fail the scan.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in text.lines().chain(stderr.lines()) {
        for bad in [
            "ERROR",
            "Could not",
            "Connection failed",
            "cannot be retrieved",
        ] {
            assert!(
                !line.contains(bad),
                "sslscan did not complete its scan ({line:?}):\n{text}\n{stderr}"
            );
        }
    }
    text
}

/// Reads sslscan's text, which must cover this server: connected, every
/// protocol tested, handshakes that succeeded, the certificate read and the
/// renegotiation test answered.
fn read_sslscan(text: &str, host: &str, port: u16) -> Sslscan {
    let lines: Vec<&str> = text.lines().collect();
    let has = |want: &str| lines.iter().any(|l| l.trim() == want);
    assert!(
        has("Connected to 127.0.0.1")
            && has(&format!(
                "Testing SSL server 127.0.0.1 on port {port} using SNI name {host}"
            )),
        "sslscan did not scan 127.0.0.1:{port} as {host}:\n{text}"
    );
    let mut protocols = Vec::new();
    for (p, line, _) in PROTOCOLS {
        let states: Vec<&str> = lines
            .iter()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                match (w.next(), w.next()) {
                    (Some(first), Some(state)) if first == line => Some(state),
                    _ => None,
                }
            })
            .filter(|s| *s == "enabled" || *s == "disabled")
            .collect();
        assert_eq!(
            states.len(),
            1,
            "sslscan: {line} tested once, enabled or disabled:\n{text}"
        );
        if states[0] == "enabled" {
            protocols.push(p.to_owned());
        }
    }
    // Accepted cipher suites: the handshakes succeeded, so what sslscan
    // says about the server was learnt from it.
    let accepted: Vec<&str> = lines
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match w.next() {
                Some("Preferred" | "Accepted") => w.next(),
                _ => None,
            }
        })
        .collect();
    assert!(
        !accepted.is_empty(),
        "sslscan got no cipher suite accepted:\n{text}"
    );
    for p in &accepted {
        assert!(
            protocols.iter().any(|e| e.as_str() == *p),
            "sslscan accepted a {p} cipher suite but found {p} disabled:\n{text}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("Subject:")),
        "sslscan read no certificate:\n{text}"
    );
    let reneg: Vec<bool> = lines
        .iter()
        .filter_map(|l| match l.trim() {
            "Session renegotiation not supported" => Some(false),
            "Secure session renegotiation supported"
            | "Insecure session renegotiation supported" => Some(true),
            _ => None,
        })
        .collect();
    assert_eq!(
        reneg.len(),
        1,
        "sslscan: one renegotiation verdict:\n{text}"
    );
    Sslscan {
        protocols,
        renegotiation: reneg[0],
    }
}

/// Runs sslyze with `commands` into `dir/file` (which must not exist yet)
/// and returns the report's bytes and JSON, which must be one completed
/// scan of this server with every command completed.
fn sslyze(
    dir: &Path,
    file: &str,
    host: &str,
    port: u16,
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
    commands: &[&str],
) -> (Vec<u8>, Value) {
    let json = dir.join(file);
    assert!(
        !json.exists(),
        "{} exists before sslyze ran",
        json.display()
    );
    // Written just before sslyze starts: the report must be newer.
    let marker = dir.join(format!("{file}.started"));
    write(&marker, b"");
    let started = modified(&marker);
    let mut cmd = Command::new("sslyze");
    cmd.args(commands);
    if let Some(ca) = ca {
        cmd.arg(format!("--certinfo_ca_file={}", ca.display()));
    }
    cmd.arg(format!("--json_out={}", json.display()));
    if let Some((cert, key)) = client {
        cmd.arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()));
    }
    let out = cmd
        .arg(format!("{host}:{port}{{127.0.0.1}}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run sslyze (./test.sh installs it): {e}"));
    let said = |out: &Output| {
        format!(
            "sslyze {commands:?} ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(out.status.success(), "{} failed", said(&out));
    let bytes = std::fs::read(&json)
        .unwrap_or_else(|e| panic!("{} wrote no report {} ({e})", said(&out), json.display()));
    assert!(
        modified(&json) >= started,
        "{} is older than this scan",
        json.display()
    );
    let v: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e})", json.display()));
    let invalid = at(&v, "/invalid_server_strings");
    assert_eq!(
        invalid.as_array().map(Vec::len),
        Some(0),
        "sslyze refused the target: {}",
        brief(invalid)
    );
    let servers = at(&v, "/server_scan_results")
        .as_array()
        .unwrap_or_else(|| panic!("sslyze: no server_scan_results list in {}", json.display()));
    assert_eq!(servers.len(), 1, "sslyze scanned one server: {}", brief(&v));
    let s = &servers[0];
    assert_eq!(
        (
            str_at(s, "/server_location/hostname"),
            at(s, "/server_location/port").as_u64(),
            str_at(s, "/server_location/ip_address"),
        ),
        (host, Some(u64::from(port)), "127.0.0.1"),
        "sslyze scanned another server"
    );
    for status in ["/connectivity_status", "/scan_status"] {
        assert_eq!(
            str_at(s, status),
            "COMPLETED",
            "sslyze {status} (connectivity error: {}); {}",
            s["connectivity_error_trace"],
            said(&out)
        );
    }
    if let Some((cert, _)) = client {
        let used = str_at(
            s,
            "/network_configuration/tls_client_auth_credentials/certificate_chain_path",
        );
        assert!(
            same_file(used, cert),
            "sslyze presented {used}, not {}",
            cert.display()
        );
    }
    for flag in commands {
        let (_, key) = SSLYZE_COMMANDS
            .iter()
            .find(|(f, _)| f == flag)
            .unwrap_or_else(|| panic!("{flag} is not one of SSLYZE_COMMANDS"));
        let attempt = at(s, &format!("/scan_result/{key}"));
        assert_eq!(
            str_at(attempt, "/status"),
            "COMPLETED",
            "sslyze {flag} did not complete ({}):\n{}",
            attempt["error_reason"],
            attempt["error_trace"].as_str().unwrap_or_default()
        );
    }
    (bytes, v)
}

/// A JSON value for a message, cut after 2,000 characters (a report is
/// hundreds of kilobytes; the saved copy has all of it).
fn brief(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(2000) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

/// The value at a JSON pointer, which must be there (not null).
fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    match v.pointer(pointer) {
        Some(x) if !x.is_null() => x,
        _ => panic!("report lacks {pointer}: {}", brief(v)),
    }
}

fn bool_at(v: &Value, pointer: &str) -> bool {
    at(v, pointer)
        .as_bool()
        .unwrap_or_else(|| panic!("{pointer} is not a boolean: {}", brief(v)))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    at(v, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string: {}", brief(v)))
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether a path sslyze reports is the file `b` (both exist and resolve
/// to the same file).
fn same_file(a: &str, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The first certificate of a PEM file.
fn first_pem_cert(chain: &Path) -> String {
    let text =
        std::fs::read_to_string(chain).unwrap_or_else(|e| panic!("{}: {e}", chain.display()));
    let end = "-----END CERTIFICATE-----";
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("{}: no certificate", chain.display()));
    let stop = text[start..]
        .find(end)
        .unwrap_or_else(|| panic!("{}: an unterminated certificate", chain.display()));
    format!("{}\n", &text[start..start + stop + end.len()])
}

impl TlsScan {
    /// Asserts the defaults meshca promises: TLS 1.3 only, no
    /// renegotiation, no compression, only strong groups, a valid chain.
    pub fn assert_meshca_defaults(&self, what: &str) {
        assert_eq!(
            self.sslscan_protocols,
            ["TLSv1.3"],
            "{what}: sslscan: {self:?}"
        );
        assert_eq!(
            self.sslyze_protocols,
            ["TLSv1.3"],
            "{what}: sslyze: {self:?}"
        );
        assert!(
            !self.sslscan_renegotiation && self.sslyze_renegotiations == 0,
            "{what}: renegotiation: {self:?}"
        );
        assert!(!self.compression, "{what}: compression: {self:?}");
        assert!(!self.groups.is_empty(), "{what}: no group found: {self:?}");
        for g in &self.groups {
            assert!(
                ["X25519", "secp256r1", "secp384r1", "X25519MLKEM768"].contains(&g.as_str()),
                "{what}: weak or unexpected group {g}: {self:?}"
            );
        }
        assert!(
            self.chain_valid,
            "{what}: the chain did not validate: {self:?}"
        );
    }
}
