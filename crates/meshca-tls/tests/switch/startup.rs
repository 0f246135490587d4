//! A bad credential set stops start-up with an error naming the file.

use std::time::Duration;

use meshca_pki::Profile;
use meshca_tls::{TlsAcceptor, TlsConfig, TlsMode};
use time::OffsetDateTime;

use crate::pki::*;

fn start_err(dir: &std::path::Path) -> String {
    let cfg = TlsConfig {
        mode: TlsMode::Mtls,
        certs: Some(dir.to_owned()),
        ..Default::default()
    };
    let e = TlsAcceptor::new(&cfg).unwrap_err();
    assert!(e.is_credentials(), "{e}");
    e.to_string()
}

#[tokio::test]
async fn bad_sets_name_the_file_and_problem() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    let d = dir.join("set");
    pki.service(&d, "default", "web");

    std::fs::remove_file(d.join("tls.key")).unwrap();
    let e = start_err(&d);
    assert!(e.contains("tls.key") && e.contains("No such file"), "{e}");

    pki.service(&d, "default", "web");
    std::fs::write(d.join("tls.crt"), "garbage").unwrap();
    let e = start_err(&d);
    assert!(e.contains("tls.crt") && e.contains("does not parse"), "{e}");

    pki.service(&d, "default", "web");
    let (_, other_key, _) = pki.leaf(
        "default",
        "x",
        Profile::Service,
        OffsetDateTime::now_utc(),
        Duration::from_secs(60),
    );
    std::fs::write(d.join("tls.key"), other_key).unwrap();
    let e = start_err(&d);
    assert!(
        e.contains("tls.key") && e.contains("is not the private key"),
        "{e}"
    );

    pki.write(
        &d,
        "default",
        "web",
        Profile::Service,
        OffsetDateTime::now_utc() - Duration::from_secs(86_400),
        Duration::from_secs(60),
    );
    let e = start_err(&d);
    assert!(e.contains("tls.crt") && e.contains("expired"), "{e}");

    pki.service(&d, "default", "web");
    std::fs::write(d.join("ca.crt"), Pki::new().bundle()).unwrap();
    let e = start_err(&d);
    assert!(
        e.contains("tls.crt") && e.contains("ca.crt") && e.contains("does not chain"),
        "{e}"
    );

    std::fs::write(d.join("ca.crt"), "").unwrap();
    let e = start_err(&d);
    assert!(e.contains("ca.crt"), "{e}");
}

#[tokio::test]
async fn config_mistakes_are_reported() {
    let cfg = TlsConfig {
        mode: TlsMode::Tls,
        certs: None,
        ..Default::default()
    };
    assert!(
        TlsAcceptor::new(&cfg)
            .unwrap_err()
            .to_string()
            .contains("certificate directory")
    );
}

#[tokio::test]
async fn a_key_others_can_read_stops_start_up_naming_the_file_mode_and_fix() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    let d = dir.join("set");
    pki.service(&d, "default", "web");
    let key = d.join("tls.key");
    chmod(&key, 0o644);
    let e = start_err(&d);
    let k = p(&key);
    assert!(
        e.starts_with(&k) && e.contains("(mode 0644)") && e.contains(&format!("`chmod 600 {k}`")),
        "{e}"
    );
    // The client side reads its key the same way.
    let e = meshca_tls::TlsConnector::new(
        &d,
        meshca_tls::ServerIdentity::parse("localhost").unwrap(),
        meshca_tls::TlsVersion::V1_3,
    )
    .unwrap_err();
    assert!(e.to_string().contains("(mode 0644)"), "{e}");
    // Group-readable, as a Kubernetes fsGroup makes a mounted secret: refused too.
    chmod(&key, 0o640);
    assert!(start_err(&d).contains("(mode 0640)"));
    // The same files, private again: they load.
    chmod(&key, 0o600);
    TlsAcceptor::new(&TlsConfig {
        mode: TlsMode::Mtls,
        certs: Some(d.clone()),
        ..Default::default()
    })
    .unwrap();
}

#[tokio::test]
async fn permissive_mode_with_an_allow_list_is_refused() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir, "default", "web");
    let cfg = TlsConfig {
        mode: TlsMode::Permissive,
        certs: Some(dir.clone()),
        allow: vec![meshca_tls::PeerMatcher::new("spiffe://cluster.local/ns/shop/*").unwrap()],
        ..Default::default()
    };
    let e = TlsAcceptor::new(&cfg).unwrap_err();
    assert!(!e.is_credentials(), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("cannot be enforced in permissive mode")
            && e.contains("use mode mtls to enforce the list, or drop the list"),
        "{e}"
    );
}
