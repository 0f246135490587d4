#![allow(clippy::unwrap_used)]

use crate::common::*;

#[test]
fn init_creates_a_root_and_intermediate_with_the_right_constraints() {
    let ca = Ca::new(&[]);
    let h = ca.hierarchy_dir();
    assert_eq!(mode(&ca.dir), 0o700);
    for key in ["root.key", "intermediate.key"] {
        assert_eq!(mode(&h.join(key)), 0o600, "{key}");
    }
    assert_eq!(mode(&ca.dir.join("admin/tls.key")), 0o600);
    assert_eq!(mode(&ca.dir.join("store.redb")), 0o600);

    let root = h.join("root.crt");
    let int = h.join("intermediate.crt");
    let root_text = tool(
        "openssl",
        &["x509", "-in", root.to_str().unwrap(), "-noout", "-text"],
    );
    assert!(root_text.contains("CA:TRUE, pathlen:1"), "{root_text}");
    assert!(
        root_text.contains("Certificate Sign, CRL Sign"),
        "{root_text}"
    );
    assert!(root_text.contains("ecdsa-with-SHA256"));
    let int_text = tool(
        "openssl",
        &["x509", "-in", int.to_str().unwrap(), "-noout", "-text"],
    );
    assert!(int_text.contains("CA:TRUE, pathlen:0"), "{int_text}");
    assert!(int_text.contains("Certificate Sign, CRL Sign"));
    assert!(int_text.contains("X509v3 Authority Key Identifier"));
    // Root 87600h by default, the intermediate half of it; both backdated, and
    // issued now (computed, not a calendar year, so the check never ages).
    let hour = std::time::Duration::from_secs(3600);
    let backdate = meshca_pki::BACKDATE;
    assert_about(lifetime(&root), 87_600 * hour + backdate, "root");
    assert_about(lifetime(&int), 43_800 * hour + backdate, "intermediate");
    let issued = std::time::SystemTime::now()
        .duration_since(validity(&root).0)
        .unwrap();
    assert!(
        issued >= backdate && issued < backdate + std::time::Duration::from_secs(120),
        "root notBefore {issued:?} ago"
    );
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            root.to_str().unwrap(),
            int.to_str().unwrap(),
        ],
    );
    // The admin credentials verify as a client certificate.
    let admin = ca.dir.join("admin");
    tool(
        "openssl",
        &[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            admin.join("ca.crt").to_str().unwrap(),
            "-untrusted",
            admin.join("tls.crt").to_str().unwrap(),
            admin.join("tls.crt").to_str().unwrap(),
        ],
    );
    let admin_cfg = std::fs::read_to_string(ca.dir.join("meshca.toml")).unwrap();
    assert!(admin_cfg.contains("trust_domain = \"cluster.local\""));
}

#[test]
fn init_refuses_an_existing_ca_and_changes_nothing() {
    let ca = Ca::new(&[]);
    let snapshot = |d: &std::path::Path| {
        let mut v: Vec<(String, Vec<u8>)> = walk(d)
            .into_iter()
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&ca.dir);
    fails(
        &["init", "--dir", ca.d()],
        &["already holds a CA", "nothing was changed"],
    );
    fails(
        &["init", "--dir", ca.d(), "--key-type", "ed25519"],
        &["already holds a CA"],
    );
    assert_eq!(before, snapshot(&ca.dir));
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn init_options_shape_the_ca() {
    for (kt, sig) in [
        ("ed25519", "ED25519"),
        ("rsa-2048", "sha256WithRSAEncryption"),
        ("ecdsa-p384", "ecdsa-with-SHA384"),
    ] {
        let ca = Ca::new(&[
            "--key-type",
            kt,
            "--trust-domain",
            "example.org",
            "--root-ttl",
            "1000h",
        ]);
        let out = ca.issue("web", "web", &[]);
        let text = tool(
            "openssl",
            &[
                "x509",
                "-in",
                out.join("tls.crt").to_str().unwrap(),
                "-noout",
                "-text",
            ],
        );
        // The signature algorithm follows the issuer's key; the leaf key is the config's type.
        assert!(
            text.contains(&format!("Signature Algorithm: {sig}")),
            "{kt}: {text}"
        );
        assert!(
            text.contains("URI:spiffe://example.org/ns/default/sa/web"),
            "{text}"
        );
        let int = ca.hierarchy_dir().join("intermediate.crt");
        let enddate = tool(
            "openssl",
            &["x509", "-in", int.to_str().unwrap(), "-noout", "-enddate"],
        );
        // 1000h root, 500h intermediate: about three weeks from now, not years.
        assert!(
            !enddate.contains("2031") && !enddate.contains("2036"),
            "{enddate}"
        );
        tool(
            "openssl",
            &[
                "verify",
                "-CAfile",
                out.join("ca.crt").to_str().unwrap(),
                "-untrusted",
                out.join("tls.crt").to_str().unwrap(),
                out.join("tls.crt").to_str().unwrap(),
            ],
        );
    }
}
