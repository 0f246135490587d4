//! TLS scanners (sslscan and sslyze) against `meshca serve` and `meshca
//! proxy server`: TLS 1.3 only, no renegotiation, no compression, strong
//! groups only, a chain that validates. Reports are kept in
//! `target/tmp/tls-reports/`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;

use meshca_testkit::scan_tls;

use crate::common::*;

fn reports() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tls-reports")
}

#[test]
fn tls_scanners_find_only_strong_tls13() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let srv = Server::start(&d, &[]);
    let admin = d.join("admin");
    let scan = scan_tls(
        "localhost",
        srv.port,
        &admin.join("ca.crt"),
        Some((&admin.join("tls.crt"), &admin.join("tls.key"))),
        &reports(),
        "meshca-serve",
    );
    scan.assert_meshca_defaults("meshca serve");

    let web = tmp.path().join("web");
    let cli = tmp.path().join("cli");
    srv.cli_ok(&[
        "issue",
        "web",
        "--dns",
        "localhost",
        "--out",
        web.to_str().unwrap(),
    ]);
    srv.cli_ok(&["issue", "cli", "--out", cli.to_str().unwrap()]);
    let port = free_port();
    let _proxy = Child(
        meshca()
            .args([
                "proxy",
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--target",
                &format!("127.0.0.1:{}", srv.port),
                "--certs",
                web.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(kept_log("scan"))
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let scan = scan_tls(
        "localhost",
        port,
        &web.join("ca.crt"),
        Some((&cli.join("tls.crt"), &cli.join("tls.key"))),
        &reports(),
        "meshca-proxy-server",
    );
    scan.assert_meshca_defaults("meshca proxy server");
    for r in &scan.reports {
        assert!(r.exists(), "{} saved", r.display());
    }
}
