//! More verifiers for what meshca issues, besides openssl: GnuTLS
//! (`certtool --verify-chain`, Debian gnutls-bin) and pyca/cryptography's
//! X.509 path validation (PyPI); CRL hygiene checked by pkilint's
//! `lint_crl`; and no RSA private-key operation through the `rsa` crate
//! (RUSTSEC-2023-0071): it is not in the build at all.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// pyca/cryptography: a client-auth and a server-auth path validation.
const PYCA_VERIFY: &str = r#"
import sys, datetime
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
chain = x509.load_pem_x509_certificates(open(sys.argv[1], "rb").read())
roots = Store(x509.load_pem_x509_certificates(open(sys.argv[2], "rb").read()))
leaf, rest = chain[0], chain[1:]
builder = PolicyBuilder().store(roots).time(datetime.datetime.now(datetime.timezone.utc))
builder.build_server_verifier(x509.DNSName(sys.argv[3])).verify(leaf, rest)
builder.build_client_verifier().verify(leaf, rest)
print("ok")
"#;

#[test]
fn gnutls_and_pyca_verify_every_key_type() {
    let ca = Ca::new(&[]);
    let bundle = ca.dir.join("admin/ca.crt");
    for kt in ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"] {
        let out = ca.issue("web", kt, &["--key-type", kt]);
        let chain = out.join("tls.crt");
        // GnuTLS wants the whole path, root last.
        let full = out.join("full.pem");
        std::fs::write(
            &full,
            std::fs::read_to_string(&chain).unwrap() + &std::fs::read_to_string(&bundle).unwrap(),
        )
        .unwrap();
        let text = tool(
            "certtool",
            &["--verify-chain", "--infile", full.to_str().unwrap()],
        );
        assert!(
            text.contains("Chain verification output: Verified"),
            "{kt}: {text}"
        );
        let text = tool(
            "python3",
            &[
                "-c",
                PYCA_VERIFY,
                chain.to_str().unwrap(),
                bundle.to_str().unwrap(),
                "web.default.svc",
            ],
        );
        assert_eq!(text.trim(), "ok", "{kt}");
    }
}

fn crl_serials(srv: &Server, dir: &Path, name: &str) -> String {
    let der = dir.join(format!("{name}.der"));
    let out = std::process::Command::new("curl")
        .args(["-sSf", "--cacert"])
        .arg(srv.dir.join("admin/ca.crt"))
        .arg(format!("{}/v1/crl", srv.url()))
        .output()
        .unwrap();
    std::fs::write(&der, &out.stdout).unwrap();
    for profile in ["PKIX", "BR"] {
        let lint = std::process::Command::new("lint_crl")
            .args([
                "lint",
                "-t",
                "CRL",
                "-p",
                profile,
                "-s",
                "WARNING",
                "--document-format",
                "DER",
            ])
            .arg(&der)
            .output()
            .unwrap_or_else(|e| panic!("cannot run lint_crl (./test.sh installs pkilint): {e}"));
        let findings = String::from_utf8_lossy(&lint.stdout).into_owned();
        assert!(
            lint.status.success() && findings.trim().is_empty(),
            "lint_crl {profile}: {findings}{}",
            String::from_utf8_lossy(&lint.stderr)
        );
    }
    tool(
        "openssl",
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            der.to_str().unwrap(),
            "-noout",
            "-text",
        ],
    )
    .to_lowercase()
}

#[test]
fn revoked_certificates_stay_on_the_crl_until_they_expire() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let issue = |name: &str, ttl: &str| -> String {
        let out = tmp.path().join(name);
        srv.cli_ok(&["issue", name, "--ttl", ttl, "--out", out.to_str().unwrap()]);
        let s = tool(
            "openssl",
            &[
                "x509",
                "-in",
                out.join("tls.crt").to_str().unwrap(),
                "-noout",
                "-serial",
            ],
        );
        s.trim().trim_start_matches("serial=").to_lowercase()
    };
    let brief = issue("brief", "3s");
    let long = issue("long", "1h");
    srv.cli_ok(&["revoke", &brief]);
    srv.cli_ok(&["revoke", &long]);
    let text = crl_serials(&srv, tmp.path(), "both");
    assert!(
        text.contains(&brief) && text.contains(&long),
        "both revoked serials listed: {text}"
    );
    // Once the brief one has expired it may leave the list (RFC 5280 §3.3);
    // the other must stay.
    std::thread::sleep(Duration::from_secs(4));
    let third = issue("third", "1h");
    srv.cli_ok(&["revoke", &third]);
    let text = crl_serials(&srv, tmp.path(), "later");
    assert!(
        !text.contains(&brief),
        "an expired certificate stays listed: {text}"
    );
    assert!(
        text.contains(&long) && text.contains(&third),
        "a live revoked certificate dropped: {text}"
    );
}

#[test]
fn the_rsa_crate_is_not_in_the_build() {
    // RUSTSEC-2023-0071 (Marvin): RSA keys and signatures go through aws-lc-rs.
    let lock =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock"))
            .unwrap();
    assert!(
        !lock.lines().any(|l| l.trim() == "name = \"rsa\""),
        "the rsa crate is in Cargo.lock"
    );
}
