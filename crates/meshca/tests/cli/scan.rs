//! TLS scanners (sslscan and sslyze) against `meshca serve` and `meshca
//! proxy server`: TLS 1.3 only, no renegotiation, no compression, strong
//! groups only, a chain that validates. Each scan reads only reports
//! written by that scan (`meshca_testkit::scan_tls` checks both scanners'
//! exit status and that every check ran); copies are kept in
//! `target/tmp/tls-reports/`, replaced by every run.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use meshca_testkit::scan_tls;

use crate::common::*;

fn reports_dir() -> PathBuf {
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
        &reports_dir(),
        "meshca-serve",
    );
    scan.assert_meshca_defaults("meshca serve");
    assert_kept(&scan.reports);

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
    // Its log is swept for the leak scan with the rest of `tmp`.
    let (_proxy, ports) = start_listening(
        1,
        &tmp.path().join("proxy-server.log"),
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
                web.to_str().unwrap(),
            ]);
            cmd
        },
        |_| true,
    );
    let port = ports[0];
    let scan = scan_tls(
        "localhost",
        port,
        &web.join("ca.crt"),
        Some((&cli.join("tls.crt"), &cli.join("tls.key"))),
        &reports_dir(),
        "meshca-proxy-server",
    );
    scan.assert_meshca_defaults("meshca proxy server");
    assert_kept(&scan.reports);
}

/// The copies of this scan's reports are in `target/tmp/tls-reports/`.
fn assert_kept(reports: &[PathBuf]) {
    assert_eq!(reports.len(), 3, "sslscan, sslyze and sslyze's SSLv2 run");
    for r in reports {
        assert!(r.starts_with(reports_dir()), "{} kept", r.display());
        let len = std::fs::metadata(r).map_or(0, |m| m.len());
        assert!(len > 0, "{} saved", r.display());
    }
}
