//! Every bad input is a clear error that names the problem, exits non-zero,
//! writes nothing and records nothing.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

/// `meshca issue` with `extra` fails naming `needles`, and nothing changed.
fn refused(ca: &Ca, name: &str, extra: &[&str], needles: &[&str]) {
    let before = ca.count();
    let out = ca.p("out-refused");
    let mut args = vec!["--dir", ca.d(), "issue", name, "--out", &out];
    args.extend_from_slice(extra);
    fails(&args, needles);
    assert!(!ca.path("out-refused").exists(), "{extra:?} wrote files");
    assert_eq!(ca.count(), before, "{extra:?} recorded a certificate");
}

#[test]
fn bad_csrs() {
    let ca = Ca::new(&[]);
    let csr = ca.p("ok.csr");
    let key = ca.p("ok.key");
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
            "/CN=tamper-me",
            "-outform",
            "DER",
        ],
    );
    // Change one byte of the signed request: the signature no longer verifies.
    let mut der = std::fs::read(&csr).unwrap();
    let pos = der.windows(9).position(|w| w == b"tamper-me").unwrap();
    der[pos] = b'T';
    std::fs::write(ca.path("broken.csr"), &der).unwrap();
    refused(
        &ca,
        "web",
        &["--csr", &ca.p("broken.csr")],
        &["broken.csr", "signature does not verify"],
    );

    std::fs::write(ca.path("text.csr"), "this is not a CSR\n").unwrap();
    refused(
        &ca,
        "web",
        &["--csr", &ca.p("text.csr")],
        &["text.csr", "neither PEM nor DER"],
    );
    let cert_pem = std::fs::read_to_string(ca.dir.join("admin/ca.crt")).unwrap();
    std::fs::write(ca.path("cert.csr"), cert_pem).unwrap();
    refused(
        &ca,
        "web",
        &["--csr", &ca.p("cert.csr")],
        &["CERTIFICATE REQUEST"],
    );

    let weak = ca.p("weak.csr");
    tool(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            &ca.p("weak.key"),
            "-out",
            &weak,
            "-subj",
            "/CN=x",
        ],
    );
    refused(
        &ca,
        "web",
        &["--csr", &weak],
        &["RSA key of 1024 bits", "at least 2048"],
    );
    refused(
        &ca,
        "web",
        &["--csr", &ca.p("missing.csr")],
        &["missing.csr"],
    );
}

#[test]
fn bad_arguments() {
    let ca = Ca::new(&[]);
    refused(
        &ca,
        "web",
        &["--key-type", "dsa"],
        &["unknown key type \"dsa\"", "ecdsa-p256"],
    );
    refused(
        &ca,
        "web",
        &["--profile", "admin"],
        &["unknown profile \"admin\"", "service"],
    );
    refused(&ca, "web", &["--ttl", "0"], &["ttl", "greater than zero"]);
    refused(&ca, "web", &["--ttl", "-1h"], &["\"-1h\"", "negative"]);
    refused(
        &ca,
        "web",
        &["--ttl", "100000h"],
        &["ttl", "maximum of 87600h"],
    );
    refused(
        &ca,
        "web",
        &["--ttl", "1 day"],
        &["invalid duration \"1 day\""],
    );
    refused(
        &ca,
        "web",
        &["--dns", "a b.example.com"],
        &["invalid DNS name \"a b.example.com\""],
    );
    refused(&ca, "web", &["--dns", "a..b"], &["\"a..b\"", "empty label"]);
    refused(&ca, "web", &["--dns", "*.example.com"], &["wildcards"]);
    let long = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(63),
    ]
    .join(".");
    refused(
        &ca,
        "web",
        &["--dns", &long],
        &["more than the 253 allowed"],
    );
    let long_label = format!("{}.example.com", "x".repeat(64));
    refused(&ca, "web", &["--dns", &long_label], &["longer than 63"]);
    refused(
        &ca,
        "web",
        &["--ip", "10.0.0.256"],
        &["invalid IP address \"10.0.0.256\""],
    );
    refused(&ca, "Web", &[], &["invalid name \"Web\""]);
    refused(&ca, "a/b", &[], &["invalid name \"a/b\""]);
    refused(&ca, "..", &[], &["invalid name \"..\""]);
    refused(
        &ca,
        "web",
        &["--namespace", "Kube_System"],
        &["invalid namespace \"Kube_System\""],
    );
    refused(
        &ca,
        "web",
        &["--namespace", "../etc"],
        &["invalid namespace"],
    );

    // --out is a file.
    std::fs::write(ca.path("afile"), "x").unwrap();
    let before = ca.count();
    fails(
        &["--dir", ca.d(), "issue", "web", "--out", &ca.p("afile")],
        &["afile", "is a file"],
    );
    assert_eq!(std::fs::read_to_string(ca.path("afile")).unwrap(), "x");
    assert_eq!(ca.count(), before);

    // init's own arguments.
    let fresh = ca.p("fresh");
    fails(
        &["init", "--dir", &fresh, "--key-type", "rsa-1024"],
        &["unknown key type"],
    );
    fails(
        &["init", "--dir", &fresh, "--trust-domain", "Bad Domain"],
        &["invalid trust domain"],
    );
    fails(
        &["init", "--dir", &fresh, "--root-ttl", "0s"],
        &["--root-ttl"],
    );
    assert!(!ca.path("fresh").exists());
}

#[test]
fn missing_or_empty_data_dirs() {
    let tmp = scratch();
    let nowhere = tmp.path().join("nowhere");
    let out = tmp.path().join("out");
    fails(
        &[
            "--dir",
            nowhere.to_str().unwrap(),
            "issue",
            "web",
            "--out",
            out.to_str().unwrap(),
        ],
        &["no CA in", "does not exist", "meshca init"],
    );
    fails(
        &["--dir", tmp.path().to_str().unwrap(), "list"],
        &["no CA in", "no meshca.toml"],
    );
    assert!(!out.exists());
}

#[test]
fn readable_ca_key_is_refused() {
    let ca = Ca::new(&[]);
    let key = ca.hierarchy_dir().join("intermediate.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    refused(
        &ca,
        "web",
        &[],
        &["intermediate.key", "readable by others", "chmod 600"],
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    ca.issue("web", "web", &[]);
}

#[test]
fn broken_config_names_the_file_and_field() {
    let ca = Ca::new(&[]);
    std::fs::write(
        ca.dir.join("meshca.toml"),
        "trust_domain = \"cluster.local\"\nmax_ttl = \"a while\"\n",
    )
    .unwrap();
    refused_without_count(&ca, &["meshca.toml", "\"a while\""]);
    std::fs::write(
        ca.dir.join("meshca.toml"),
        "trust_domain = \"cluster.local\"\nkey_typ = \"ed25519\"\n",
    )
    .unwrap();
    refused_without_count(&ca, &["meshca.toml", "key_typ"]);
}

fn refused_without_count(ca: &Ca, needles: &[&str]) {
    let out = ca.p("o");
    fails(&["--dir", ca.d(), "issue", "web", "--out", &out], needles);
    assert!(!ca.path("o").exists());
}
