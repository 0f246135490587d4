//! More verifiers for what meshca issues, besides openssl: GnuTLS
//! (`certtool --verify-chain`, Debian gnutls-bin) and pyca/cryptography's
//! X.509 path validation (PyPI); CRLs verified by openssl and GnuTLS
//! (signed by the issuer, revoking what was revoked and nothing else:
//! `crl.rs`) and their hygiene checked by pkilint's `lint_crl`; and no RSA
//! private-key operation through the `rsa` crate (RUSTSEC-2023-0071): it is
//! not in the build at all.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::crl;

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

/// The server's CRL (`/v1/crl`), lint-clean for pkilint's PKIX and BR
/// profiles, saved as PEM under `dir`.
fn linted_crl(srv: &Server, dir: &Path, name: &str) -> PathBuf {
    let pem = crl::fetch(srv, "/v1/crl", &dir.join(format!("{name}.pem")));
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
                "PEM",
            ])
            .arg(&pem)
            .output()
            .unwrap_or_else(|e| panic!("cannot run lint_crl (./test.sh installs pkilint): {e}"));
        let findings = String::from_utf8_lossy(&lint.stdout).into_owned();
        assert!(
            lint.status.success() && findings.trim().is_empty(),
            "lint_crl {profile}: {findings}{}",
            String::from_utf8_lossy(&lint.stderr)
        );
    }
    pem
}

/// The serials the CRL of `chain`'s issuer lists, once it is verified to be
/// signed by that issuer.
fn listed(chain: &Path, bundle: &Path, crls: &Path) -> Vec<String> {
    crl::entries(chain, bundle, crls)
        .into_iter()
        .map(|(serial, _)| serial)
        .collect()
}

#[test]
fn revoked_certificates_stay_on_the_crl_until_they_expire() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let bundle = srv.dir.join("admin/ca.crt");
    let issue = |name: &str, ttl: &str| -> PathBuf {
        let out = tmp.path().join(name);
        srv.cli_ok(&["issue", name, "--ttl", ttl, "--out", out.to_str().unwrap()]);
        out.join("tls.crt")
    };
    // Never revoked: what passes against the same CRLs.
    let alive = issue("alive", "1h");
    let brief = issue("brief", "3s");
    let long = issue("long", "1h");
    let (brief_serial, long_serial) = (crl::serial(&brief), crl::serial(&long));
    srv.cli_ok(&["revoke", &brief_serial]);
    srv.cli_ok(&["revoke", &long_serial]);
    let crls = linted_crl(&srv, tmp.path(), "both");
    let serials = listed(&long, &bundle, &crls);
    assert!(
        serials.contains(&brief_serial) && serials.contains(&long_serial),
        "both revoked serials listed: {serials:?}"
    );
    // Revoked without a reason: the entry carries no reason code.
    crl::assert_checks(&long, &alive, &bundle, &crls, None);
    // Once the brief one has expired it may leave the list (RFC 5280 §3.3);
    // the other must stay. (An expired certificate fails verification for
    // its expiry, whatever the CRL: its absence is read from the verified
    // CRL's entries.) Past its own notAfter, read from the certificate.
    wait_past(validity(&brief).1);
    let third = issue("third", "1h");
    srv.cli_ok(&["revoke", &crl::serial(&third)]);
    let crls = linted_crl(&srv, tmp.path(), "later");
    let serials = listed(&long, &bundle, &crls);
    assert!(
        !serials.contains(&brief_serial),
        "an expired certificate stays listed: {serials:?}"
    );
    crl::assert_revoked(&long, &bundle, &crls, None);
    crl::assert_revoked(&third, &bundle, &crls, None);
    crl::assert_good(&alive, &bundle, &crls);
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
