//! pkilint (PyPI) lints the root, the intermediate and leaves of every profile
//! and key type. Two findings are expected, because pkilint checks names with
//! web-PKI rules: a single-label DNS name (`web`) and the `spiffe://` URI.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use crate::common::*;

const ALLOWED: [&str; 2] = ["pkix.invalid_domain_name_syntax", "pkix.invalid_uri_syntax"];

fn lint(file: &Path) -> Vec<String> {
    let out = std::process::Command::new("lint_pkix_cert")
        .args(["lint", "-s", "ERROR", file.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run lint_pkix_cert (pip install pkilint; ./test.sh does): {e}")
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| l.contains("(ERROR)") || l.contains("(FATAL)"))
        .filter(|l| !ALLOWED.iter().any(|a| l.trim_start().starts_with(a)))
        .map(|l| format!("{}: {l}", file.display()))
        .collect()
}

fn leaf_only(chain: &Path, dest: &Path) {
    let first = split_pem(&std::fs::read_to_string(chain).unwrap()).remove(0);
    std::fs::write(dest, first).unwrap();
}

#[test]
fn pkilint_finds_no_errors() {
    let mut files = Vec::new();
    for ca_key in ["ecdsa-p256", "rsa-2048"] {
        let ca = Ca::new(&["--key-type", ca_key]);
        let h = ca.hierarchy_dir();
        files.push(h.join("root.crt"));
        files.push(h.join("intermediate.crt"));
        for profile in ["service", "server", "client", "bootstrap", "webhook"] {
            let out = ca.issue(
                "web",
                profile,
                &[
                    "--profile",
                    profile,
                    "--dns",
                    "web.example.com",
                    "--ip",
                    "10.0.0.1",
                ],
            );
            let leaf = ca.path(&format!("{profile}.leaf.pem"));
            leaf_only(&out.join("tls.crt"), &leaf);
            files.push(leaf);
        }
        for kt in ["ecdsa-p384", "ed25519", "rsa-3072"] {
            let out = ca.issue("db", kt, &["--key-type", kt]);
            let leaf = ca.path(&format!("{kt}.leaf.pem"));
            leaf_only(&out.join("tls.crt"), &leaf);
            files.push(leaf);
        }
        // Keep the temporary directory alive while linting.
        let findings: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = files.iter().map(|f| s.spawn(move || lint(f))).collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert!(
            findings.is_empty(),
            "pkilint findings:\n{}",
            findings.join("\n")
        );
        files.clear();
    }
}
