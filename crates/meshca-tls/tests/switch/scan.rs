//! TLS scanners (sslscan and sslyze) against a meshca-tls server in each
//! TLS mode: TLS 1.3 only by default, no renegotiation, no compression,
//! strong groups only, a valid chain. Each scan reads only what it wrote
//! (`meshca_testkit::scan_tls` checks the scanners' exit status and that
//! every check ran, SSLv2 included); copies of the reports are kept in
//! `target/tmp/tls-reports/`, replaced by every run.

use meshca_tls::{TlsConfig, TlsMode};

use crate::pki::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanners_find_only_strong_tls13_in_every_mode() {
    let (_tmp, dir) = tmp();
    let pki = Pki::new();
    let server = dir.join("server");
    let client = dir.join("client");
    pki.service(&server, "default", "web");
    pki.service(&client, "default", "cli");
    let reports = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tls-reports");
    for mode in [TlsMode::Tls, TlsMode::Mtls, TlsMode::Permissive] {
        let config = TlsConfig {
            mode,
            certs: Some(server.clone()),
            ..Default::default()
        };
        let addr = start(&config).await;
        let (ca, cert, key) = (
            server.join("ca.crt"),
            client.join("tls.crt"),
            client.join("tls.key"),
        );
        let reports = reports.clone();
        let scan = tokio::task::spawn_blocking(move || {
            meshca_testkit::scan_tls(
                "localhost",
                addr.port(),
                &ca,
                Some((&cert, &key)),
                &reports,
                &format!("meshca-tls-{}", mode.as_str()),
            )
        })
        .await
        .unwrap();
        scan.assert_meshca_defaults(&format!("meshca-tls in mode {}", mode.as_str()));
        assert_eq!(scan.reports.len(), 3, "sslscan, sslyze, sslyze's SSLv2 run");
        for r in &scan.reports {
            let len = std::fs::metadata(r).map_or(0, |m| m.len());
            assert!(len > 0, "{} kept", r.display());
        }
    }
}
