//! TLS scanners against a listener: sslscan (Debian) and sslyze (PyPI),
//! their reports saved, the findings read back for assertions.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the two scanners found.
#[derive(Debug, Clone)]
pub struct TlsScan {
    /// Protocol versions sslscan found enabled (`TLSv1.3`, ...).
    pub sslscan_protocols: Vec<String>,
    /// Protocol versions with at least one cipher suite sslyze got accepted.
    pub sslyze_protocols: Vec<String>,
    /// Whether sslscan found renegotiation supported.
    pub sslscan_renegotiation: bool,
    /// Client-initiated renegotiations sslyze got through.
    pub sslyze_renegotiations: u64,
    /// Whether sslyze found TLS compression.
    pub compression: bool,
    /// Key exchange groups sslyze got accepted.
    pub groups: Vec<String>,
    /// Whether sslyze validated the chain against the given CA and host.
    pub chain_valid: bool,
    /// The saved reports.
    pub reports: Vec<PathBuf>,
}

/// Scans `127.0.0.1:port` as `host` (SNI and name checks) with both
/// scanners, trusting `ca` and presenting `client` (cert, key) when given;
/// saves `<name>.sslscan.txt` and `<name>.sslyze.json` in `reports`.
pub fn scan_tls(
    host: &str,
    port: u16,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    reports: &Path,
    name: &str,
) -> TlsScan {
    std::fs::create_dir_all(reports).unwrap_or_else(|e| panic!("{}: {e}", reports.display()));
    let mut sslscan = Command::new("sslscan");
    sslscan.args(["--no-colour", &format!("--sni-name={host}")]);
    if let Some((cert, key)) = client {
        sslscan
            .arg(format!("--certs={}", cert.display()))
            .arg(format!("--pk={}", key.display()));
    }
    let out = sslscan
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run sslscan (./test.sh installs it): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let sslscan_report = reports.join(format!("{name}.sslscan.txt"));
    std::fs::write(&sslscan_report, &text).unwrap_or_else(|e| panic!("{e}"));
    let sslscan_protocols = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some(p), Some("enabled")) if p.starts_with("SSL") || p.starts_with("TLS") => {
                    Some(p.to_owned())
                }
                _ => None,
            }
        })
        .collect();
    let sslscan_renegotiation = text.lines().any(|l| l.contains("renegotiation supported"));

    let json = reports.join(format!("{name}.sslyze.json"));
    let mut sslyze = Command::new("sslyze");
    sslyze
        .arg(format!("--certinfo_ca_file={}", ca.display()))
        .arg(format!("--json_out={}", json.display()));
    if let Some((cert, key)) = client {
        sslyze
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()));
    }
    let out = sslyze
        .arg(format!("{host}:{port}{{127.0.0.1}}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run sslyze (./test.sh installs it): {e}"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap_or_default())
        .unwrap_or_else(|e| {
            panic!(
                "sslyze wrote no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
    let r = &v["server_scan_results"][0]["scan_result"];
    assert!(r.is_object(), "sslyze could not scan {host}:{port}: {v}");
    let sslyze_protocols = [
        ("SSLv2", "ssl_2_0_cipher_suites"),
        ("SSLv3", "ssl_3_0_cipher_suites"),
        ("TLSv1.0", "tls_1_0_cipher_suites"),
        ("TLSv1.1", "tls_1_1_cipher_suites"),
        ("TLSv1.2", "tls_1_2_cipher_suites"),
        ("TLSv1.3", "tls_1_3_cipher_suites"),
    ]
    .iter()
    .filter(|(_, k)| {
        r[*k]["result"]["accepted_cipher_suites"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .map(|(p, _)| (*p).to_owned())
    .collect();
    let groups = r["elliptic_curves"]["result"]["supported_curves"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let chain_valid =
        r["certificate_info"]["result"]["certificate_deployments"][0]["path_validation_results"]
            .as_array()
            .is_some_and(|a| {
                a.iter().any(|p| {
                    p["trust_store"]["name"]
                        .as_str()
                        .is_some_and(|n| n.contains("Supplied"))
                        && p["was_validation_successful"] == true
                })
            });
    TlsScan {
        sslscan_protocols,
        sslyze_protocols,
        sslscan_renegotiation,
        sslyze_renegotiations:
            r["session_renegotiation"]["result"]["client_renegotiations_success_count"]
                .as_u64()
                .unwrap_or(u64::MAX),
        compression: r["tls_compression"]["result"]["supports_compression"] != false,
        groups,
        chain_valid,
        reports: vec![sslscan_report, json],
    }
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
