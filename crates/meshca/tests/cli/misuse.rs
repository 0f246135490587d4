//! Certificate usage and chain misuse, refused by meshca's own verifier
//! (meshca-tls, which `meshca serve` and `meshca proxy` both use): a
//! server-only certificate as a client certificate, a CA certificate as a
//! leaf, a leaf signed by a leaf, a chain longer than the path length
//! allows. (A certificate not yet valid: `meshca-tls`'s own tests.)
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::*;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A key and a certificate for it, signed by `ca` (cert, key) with `ext`
/// (openssl extension lines); returns (cert file, key file).
fn openssl_signed(dir: &Path, name: &str, ca: (&Path, &Path), ext: &str) -> (PathBuf, PathBuf) {
    let (key, csr, crt, extf) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.ext")),
    );
    tool(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            p(&key),
            "-out",
            p(&csr),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(&extf, ext).unwrap();
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            p(&csr),
            "-CA",
            p(ca.0),
            "-CAkey",
            p(ca.1),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            p(&extf),
            "-out",
            p(&crt),
        ],
    );
    (crt, key)
}

fn concat(out: &Path, parts: &[&Path]) -> PathBuf {
    let text: String = parts
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    std::fs::write(out, text).unwrap();
    out.to_owned()
}

/// The first certificate of a PEM file, alone.
fn first_cert(file: &Path, out: &Path) -> PathBuf {
    let text = std::fs::read_to_string(file).unwrap();
    std::fs::write(out, &split_pem(&text)[0]).unwrap();
    out.to_owned()
}

#[test]
fn misused_certificates_and_chains_are_refused() {
    let tmp = scratch();
    let t = tmp.path();
    let d = t.join("data");
    let srv = Server::start(&d, &[]);
    let web = t.join("web");
    srv.cli_ok(&["issue", "web", "--dns", "localhost", "--out", p(&web)]);
    let cli = t.join("cli");
    srv.cli_ok(&["issue", "cli", "--out", p(&cli)]);
    let server_only = t.join("server-only");
    srv.cli_ok(&[
        "issue",
        "srv",
        "--profile",
        "server",
        "--out",
        p(&server_only),
    ]);
    let hierarchy = std::fs::read_dir(d.join("ca"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let (int_crt, int_key) = (
        hierarchy.join("intermediate.crt"),
        hierarchy.join("intermediate.key"),
    );

    // A leaf signed by a leaf (cli's certificate and key as its "CA").
    let cli_leaf = first_cert(&cli.join("tls.crt"), &t.join("cli-leaf.crt"));
    let spiffe = "subjectAltName=URI:spiffe://cluster.local/ns/default/sa/evil\nextendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n";
    let (by_leaf, by_leaf_key) =
        openssl_signed(t, "by-leaf", (&cli_leaf, &cli.join("tls.key")), spiffe);
    let by_leaf_chain = concat(
        &t.join("by-leaf-chain.crt"),
        &[&by_leaf, &cli.join("tls.crt")],
    );
    // A sub-CA under the intermediate (pathlen 0 forbids it), and a leaf under that.
    let (sub, sub_key) = openssl_signed(
        t,
        "sub-ca",
        (&int_crt, &int_key),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    );
    let (deep, deep_key) = openssl_signed(t, "deep", (&sub, &sub_key), spiffe);
    let deep_chain = concat(&t.join("deep-chain.crt"), &[&deep, &sub, &int_crt]);

    let cases: Vec<(&str, PathBuf, PathBuf)> = vec![
        (
            "a server-only certificate as a client certificate",
            server_only.join("tls.crt"),
            server_only.join("tls.key"),
        ),
        (
            "a CA certificate as a leaf",
            int_crt.clone(),
            int_key.clone(),
        ),
        ("a leaf signed by a leaf", by_leaf_chain, by_leaf_key),
        (
            "a chain longer than the path length allows",
            deep_chain,
            deep_key,
        ),
    ];

    // meshca proxy server (mTLS) in front of the CA itself as a target,
    // waited for until it listens itself (started again elsewhere when its
    // port was taken); its log is swept for the leak scan with `tmp`.
    let (_proxy, ports) = start_listening(
        1,
        &t.join("misuse-proxy.log"),
        |ports| {
            let mut cmd = meshca();
            cmd.args([
                "proxy",
                "server",
                "--listen",
                &format!("127.0.0.1:{}", ports[0]),
                "--target",
                &format!("127.0.0.1:{}", srv.port),
                "--certs",
                p(&web),
            ])
            .stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    let port = ports[0];
    let curl = |url: &str, cert: &Path, key: &Path| {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                "--cacert",
                p(&web.join("ca.crt")),
                "--cert",
                p(cert),
                "--key",
                p(key),
                url,
            ])
            .output()
            .unwrap()
    };
    // The good client gets through (whatever the target answers), so the
    // refusals below are the certificates'.
    let good = curl(
        &format!("https://localhost:{port}/healthz"),
        &cli.join("tls.crt"),
        &cli.join("tls.key"),
    );
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    // A TLS refusal is curl's 35 (in the handshake), 56 (the alert read
    // after it) or 55 (the connection closed under curl's request, the alert
    // unread: the race `refusal.rs` describes): never 7 (nothing listening:
    // a crashed proxy or server) or 28 (no answer). That each was a refusal
    // and not a crash is shown by the calls that follow it.
    let tls_refused = |out: &std::process::Output| matches!(out.status.code(), Some(35 | 55 | 56));
    for (what, cert, key) in &cases {
        let out = curl(&format!("https://localhost:{port}/healthz"), cert, key);
        assert!(
            tls_refused(&out),
            "the proxy did not refuse {what} in TLS: {:?} {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // And it still serves the good client.
        let good = curl(
            &format!("https://localhost:{port}/healthz"),
            &cli.join("tls.crt"),
            &cli.join("tls.key"),
        );
        assert!(
            good.status.success(),
            "after {what}: {}",
            String::from_utf8_lossy(&good.stderr)
        );
        // The API: a client certificate that does not verify is refused in
        // the handshake (or, with the optional client auth of the API,
        // never counts as an identity).
        let out = curl(&format!("{}/v1/ca", srv.url()), cert, key);
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_ne!(
            out.status.code(),
            Some(28),
            "meshca serve did not answer {what} within curl's 10 s"
        );
        // Refused in TLS, or taken for nobody: 401 on the admin's /v1/ca
        // (a 403 would mean it counted as a workload's identity).
        assert!(
            tls_refused(&out) || (out.status.success() && code == "401"),
            "meshca serve took {what} for someone: {:?} {code} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (status, body) = srv.curl("GET", "/healthz", None, &[]);
    assert_eq!(status, 200, "meshca serve still serves: {body}");
}
