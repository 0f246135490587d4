#![allow(clippy::unwrap_used)]

use crate::common::*;

fn verify(out: &std::path::Path, purpose: &str) {
    let crt = out.join("tls.crt");
    tool(
        "openssl",
        &[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            out.join("ca.crt").to_str().unwrap(),
            "-untrusted",
            crt.to_str().unwrap(),
            crt.to_str().unwrap(),
        ],
    );
}

fn pubkey_of_cert(p: &std::path::Path) -> String {
    tool(
        "openssl",
        &["x509", "-in", p.to_str().unwrap(), "-noout", "-pubkey"],
    )
}

#[test]
fn issue_writes_a_verifiable_chain_for_every_key_type() {
    let ca = Ca::new(&[]);
    for kt in [
        "ecdsa-p256",
        "ecdsa-p384",
        "ed25519",
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
    ] {
        let out = ca.issue(
            "web",
            kt,
            &[
                "--namespace",
                "shop",
                "--key-type",
                kt,
                "--dns",
                "web.example.com",
                "--ip",
                "10.1.2.3",
                "--ip",
                "::1",
            ],
        );
        assert_eq!(mode(&out.join("tls.key")), 0o600);
        verify(&out, "sslserver");
        verify(&out, "sslclient");
        let crt = out.join("tls.crt");
        let chain = split_pem(&std::fs::read_to_string(&crt).unwrap());
        assert_eq!(chain.len(), 2, "leaf then intermediate");
        let text = tool(
            "openssl",
            &["x509", "-in", crt.to_str().unwrap(), "-noout", "-text"],
        );
        for want in [
            "Subject: CN = web.shop.svc.cluster.local",
            "URI:spiffe://cluster.local/ns/shop/sa/web",
            "DNS:web.shop.svc, DNS:web.shop.svc.cluster.local, DNS:web.example.com",
            "IP Address:10.1.2.3",
            "IP Address:0:0:0:0:0:0:0:1",
            "TLS Web Server Authentication, TLS Web Client Authentication",
            "CA:FALSE",
        ] {
            assert!(text.contains(want), "{kt}: missing {want:?} in\n{text}");
        }
        // EC and Ed25519 keys sign; only RSA keys may also encipher.
        assert_eq!(
            text.contains("Key Encipherment"),
            kt.starts_with("rsa"),
            "{kt}: {text}"
        );
        // The key on disk is the certificate's.
        let key_pub = tool(
            "openssl",
            &[
                "pkey",
                "-in",
                out.join("tls.key").to_str().unwrap(),
                "-pubout",
            ],
        );
        assert_eq!(key_pub, pubkey_of_cert(&crt), "{kt}");
        // A 128-bit serial: at least 64 bits of it.
        let serial = tool(
            "openssl",
            &["x509", "-in", crt.to_str().unwrap(), "-noout", "-serial"],
        );
        let hex = serial.trim().trim_start_matches("serial=");
        assert!(hex.len() >= 30, "{hex}");
    }
}

#[test]
fn profiles_set_usages_and_lifetimes() {
    let ca = Ca::new(&[]);
    let int = ca.hierarchy_dir().join("intermediate.crt");
    let day = std::time::Duration::from_secs(86_400);
    // None: longer than the intermediate, so cut to its notAfter.
    for (profile, eku, days) in [
        (
            "service",
            "TLS Web Server Authentication, TLS Web Client Authentication",
            Some(1),
        ),
        ("server", "TLS Web Server Authentication\n", Some(1)),
        ("client", "TLS Web Client Authentication\n", Some(1)),
        ("bootstrap", "TLS Web Client Authentication\n", None),
        ("webhook", "TLS Web Server Authentication\n", None),
    ] {
        let out = ca.issue("web", profile, &["--profile", profile]);
        let crt = out.join("tls.crt");
        let text = tool(
            "openssl",
            &["x509", "-in", crt.to_str().unwrap(), "-noout", "-text"],
        );
        assert!(text.contains(eku), "{profile}: {text}");
        // Exactly the profile's lifetime (plus the backdating), from both sides:
        // neither shorter nor longer.
        match days {
            Some(days) => assert_about(lifetime(&crt), days * day + meshca_pki::BACKDATE, profile),
            None => assert_eq!(validity(&crt).1, validity(&int).1, "{profile}"),
        }
    }
    // A 87600h webhook certificate is cut to the intermediate's notAfter, and says so.
    let out = run(&[
        "--dir",
        ca.d(),
        "issue",
        "hook",
        "--profile",
        "webhook",
        "--out",
        &ca.p("hook"),
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("notAfter was cut"));
    let end = |p: &std::path::Path| {
        tool(
            "openssl",
            &["x509", "-in", p.to_str().unwrap(), "-noout", "-enddate"],
        )
    };
    assert_eq!(end(&ca.path("hook/tls.crt")), end(&int));
}

#[test]
fn csr_key_is_certified_and_its_names_are_ignored() {
    let ca = Ca::new(&[]);
    let key = ca.p("csr.key");
    let csr = ca.p("req.csr");
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
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=admin/O=system:masters",
            "-addext",
            "subjectAltName=DNS:evil.example.com,URI:spiffe://cluster.local/ns/kube-system/sa/admin,IP:1.2.3.4",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    );
    let out = ca.issue("web", "web", &["--csr", &csr]);
    assert!(!out.join("tls.key").exists(), "no key is written for a CSR");
    verify(&out, "sslserver");
    let crt = out.join("tls.crt");
    let text = tool(
        "openssl",
        &["x509", "-in", crt.to_str().unwrap(), "-noout", "-text"],
    );
    for bad in [
        "evil.example.com",
        "kube-system",
        "1.2.3.4",
        "system:masters",
        "CA:TRUE",
        "CN = admin",
    ] {
        assert!(
            !text.contains(bad),
            "CSR content {bad:?} leaked into\n{text}"
        );
    }
    assert!(text.contains("URI:spiffe://cluster.local/ns/default/sa/web"));
    let csr_pub = tool("openssl", &["req", "-in", &csr, "-noout", "-pubkey"]);
    assert_eq!(csr_pub, pubkey_of_cert(&crt));
    // DER CSRs work too.
    let der = ca.p("req.der");
    tool(
        "openssl",
        &["req", "-in", &csr, "-outform", "DER", "-out", &der],
    );
    let out = ca.issue("web", "web-der", &["--csr", &der]);
    verify(&out, "sslclient");
}

#[test]
fn inspect_reports_and_verifies() {
    let ca = Ca::new(&[]);
    let out = ca.issue("web", "web", &["--ttl", "1h30m"]);
    let crt = out.join("tls.crt");
    let json = ok(&["--dir", ca.d(), "inspect", crt.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let leaf = &v["certificates"][0];
    assert_eq!(
        leaf["spiffe_id"],
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(leaf["key_type"], "ecdsa-p256");
    assert_eq!(leaf["profile"], "service");
    assert!(
        leaf["time_left"]
            .as_str()
            .unwrap()
            .starts_with("1 hour 29 minutes")
            || leaf["time_left"]
                .as_str()
                .unwrap()
                .starts_with("1 hour 30 minutes"),
        "{leaf}"
    );
    let fp = tool(
        "openssl",
        &[
            "x509",
            "-in",
            crt.to_str().unwrap(),
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    );
    let fp = fp
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert_eq!(leaf["fingerprint_sha256"], fp.as_str());
    assert_eq!(v["certificates"][1]["is_ca"], true);
    assert_eq!(v["verification"]["ok"], true);

    // From stdin, human output.
    let mut child = meshca()
        .args(["inspect", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&crt).unwrap())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("SPIFFE ID:    spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );
    assert!(text.contains("left)"), "{text}");

    // Against another CA's bundle: reported, and the exit code says so.
    let other = Ca::new(&[]);
    let o = run(&[
        "inspect",
        crt.to_str().unwrap(),
        "--ca",
        other.dir.join("admin/ca.crt").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("does NOT verify"));
    // A bundle inspects as a list of CA certificates.
    let bundle = ok(&["inspect", out.join("ca.crt").to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    assert_eq!(v["certificates"][0]["self_signed"], true);
}
