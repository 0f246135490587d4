//! Adopting an existing CA made by openssl.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

pub fn openssl_root(dir: &std::path::Path, name: &str) -> (String, String) {
    let crt = dir.join(format!("{name}.crt")).to_str().unwrap().to_owned();
    let key = dir.join(format!("{name}.key")).to_str().unwrap().to_owned();
    tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            &format!("/O=Corp/CN={name}"),
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (crt, key)
}

pub fn openssl_intermediate(dir: &std::path::Path, root: &(String, String)) -> (String, String) {
    let crt = dir.join("int.crt").to_str().unwrap().to_owned();
    let key = dir.join("int.key").to_str().unwrap().to_owned();
    let csr = dir.join("int.csr").to_str().unwrap().to_owned();
    let ext = dir.join("int.ext");
    std::fs::write(&ext, "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n").unwrap();
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
            "/O=Corp/CN=Corp Issuing",
        ],
    );
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &root.0,
            "-CAkey",
            &root.1,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "365",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (crt, key)
}

#[test]
fn imported_root_signs_a_new_intermediate() {
    let tmp = scratch();
    let root = openssl_root(tmp.path(), "Corp Root");
    let d = tmp.path().join("ca");
    let out = ok(&[
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--import-root",
        &root.0,
        "--import-key",
        &root.1,
    ]);
    assert!(out.contains("Imported"), "{out}");
    let web = tmp.path().join("web");
    ok(&[
        "--dir",
        d.to_str().unwrap(),
        "issue",
        "web",
        "--out",
        web.to_str().unwrap(),
    ]);
    // The chain ends at the imported root, and only that root is trusted.
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            &root.0,
            "-untrusted",
            web.join("tls.crt").to_str().unwrap(),
            web.join("tls.crt").to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(web.join("ca.crt")).unwrap().trim(),
        std::fs::read_to_string(&root.0).unwrap().trim()
    );
}

#[test]
fn imported_intermediate_signs_directly() {
    let tmp = scratch();
    let root = openssl_root(tmp.path(), "Corp Root");
    let int = openssl_intermediate(tmp.path(), &root);
    let d = tmp.path().join("ca");
    ok(&[
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--import-root",
        &root.0,
        "--import-intermediate",
        &int.0,
        "--import-intermediate-key",
        &int.1,
    ]);
    let web = tmp.path().join("web");
    ok(&[
        "--dir",
        d.to_str().unwrap(),
        "issue",
        "web",
        "--out",
        web.to_str().unwrap(),
    ]);
    let text = tool(
        "openssl",
        &[
            "x509",
            "-in",
            web.join("tls.crt").to_str().unwrap(),
            "-noout",
            "-issuer",
        ],
    );
    assert!(text.contains("Corp Issuing"), "{text}");
    tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            &root.0,
            "-untrusted",
            web.join("tls.crt").to_str().unwrap(),
            web.join("tls.crt").to_str().unwrap(),
        ],
    );
}

#[test]
fn bad_imports_are_refused_and_leave_nothing() {
    let tmp = scratch();
    let root = openssl_root(tmp.path(), "Corp Root");
    let other = openssl_root(tmp.path(), "Other Root");
    let int = openssl_intermediate(tmp.path(), &other);
    let d = tmp.path().join("ca");
    let ds = d.to_str().unwrap();

    // The key belongs to another certificate.
    fails(
        &[
            "init",
            "--dir",
            ds,
            "--import-root",
            &root.0,
            "--import-key",
            &other.1,
        ],
        &["Other Root.key", "does not match"],
    );
    // A leaf is not a CA.
    let leaf_ca = Ca::new(&[]);
    let leaf = leaf_ca.issue("web", "web", &[]);
    fails(
        &[
            "init",
            "--dir",
            ds,
            "--import-root",
            leaf.join("tls.crt").to_str().unwrap(),
            "--import-key",
            leaf.join("tls.key").to_str().unwrap(),
        ],
        &["expected one certificate"],
    );
    let single = tmp.path().join("leaf.pem");
    std::fs::write(
        &single,
        split_pem(&std::fs::read_to_string(leaf.join("tls.crt")).unwrap()).remove(0),
    )
    .unwrap();
    fails(
        &[
            "init",
            "--dir",
            ds,
            "--import-root",
            single.to_str().unwrap(),
            "--import-key",
            leaf.join("tls.key").to_str().unwrap(),
        ],
        &["CA:TRUE"],
    );
    // A key others can read.
    std::fs::set_permissions(&root.1, std::fs::Permissions::from_mode(0o644)).unwrap();
    fails(
        &[
            "init",
            "--dir",
            ds,
            "--import-root",
            &root.0,
            "--import-key",
            &root.1,
        ],
        &["readable by others", "chmod 600"],
    );
    std::fs::set_permissions(&root.1, std::fs::Permissions::from_mode(0o600)).unwrap();
    // An intermediate from another root, and half a pair.
    fails(
        &[
            "init",
            "--dir",
            ds,
            "--import-root",
            &root.0,
            "--import-intermediate",
            &int.0,
            "--import-intermediate-key",
            &int.1,
        ],
        &["int.crt", "not \"O=Corp, CN=Corp Root\""],
    );
    fails(
        &[
            "init",
            "--dir",
            ds,
            "--import-root",
            &root.0,
            "--import-intermediate",
            &int.0,
        ],
        &["import-intermediate-key"],
    );
    // No root key and no intermediate: nothing could sign.
    fails(
        &["init", "--dir", ds, "--import-root", &root.0],
        &["--import-key"],
    );
    assert!(!d.exists(), "a failed import left {d:?} behind");
}
