//! CA certificates offered to `meshca init --import-*` that name the right
//! issuer but carry another key's signature: an impostor root with the same
//! subject as the real one (made by openssl) signed them. The names match,
//! so only the signature check (`check_signed_by` in
//! crates/meshca-pki/src/ca.rs) refuses them; the error names the file.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use crate::common::*;
use crate::import::{openssl_intermediate, openssl_root};

fn subject_and_issuer(cert: &str) -> (String, String) {
    let out = tool(
        "openssl",
        &[
            "x509", "-in", cert, "-noout", "-subject", "-issuer", "-nameopt", "compat",
        ],
    );
    let mut lines = out.lines();
    let subject = lines
        .next()
        .unwrap()
        .strip_prefix("subject=")
        .unwrap()
        .to_owned();
    let issuer = lines
        .next()
        .unwrap()
        .strip_prefix("issuer=")
        .unwrap()
        .to_owned();
    (subject, issuer)
}

#[test]
fn an_intermediate_naming_the_root_but_signed_by_another_key_is_refused() {
    let tmp = scratch();
    let real = openssl_root(tmp.path(), "Corp Root");
    let elsewhere = tmp.path().join("impostor");
    std::fs::create_dir(&elsewhere).unwrap();
    let impostor = openssl_root(&elsewhere, "Corp Root");
    let int = openssl_intermediate(&elsewhere, &impostor);
    // The same names: the intermediate's issuer is the real root's subject.
    let (real_subject, _) = subject_and_issuer(&real.0);
    assert_eq!(subject_and_issuer(&impostor.0).0, real_subject);
    assert_eq!(subject_and_issuer(&int.0).1, real_subject);

    let d = tmp.path().join("ca");
    let stderr = fails(
        &[
            "init",
            "--dir",
            d.to_str().unwrap(),
            "--import-root",
            &real.0,
            "--import-intermediate",
            &int.0,
            "--import-intermediate-key",
            &int.1,
        ],
        &[
            &format!("cannot import {}", int.0),
            "intermediate certificate is not signed by \"O=Corp, CN=Corp Root\"",
        ],
    );
    assert!(!stderr.contains("names issuer"), "{stderr}");
    assert!(!d.exists(), "a refused import left {d:?} behind");
    // With the root that did sign it, the same files are taken.
    ok(&[
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--import-root",
        &impostor.0,
        "--import-intermediate",
        &int.0,
        "--import-intermediate-key",
        &int.1,
    ]);
}

#[test]
fn a_root_naming_itself_but_signed_by_another_key_is_refused() {
    let tmp = scratch();
    let impostor = openssl_root(tmp.path(), "Corp Root");
    // A CA certificate whose subject and issuer are both "Corp Root", for
    // its own key, signed by the impostor's key.
    let key = tmp.path().join("fake.key");
    let csr = tmp.path().join("fake.csr");
    let crt = tmp.path().join("fake.crt");
    let ext = tmp.path().join("fake.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
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
            &s(&key),
            "-out",
            &s(&csr),
            "-subj",
            "/O=Corp/CN=Corp Root",
        ],
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &impostor.0,
            "-CAkey",
            &impostor.1,
            "-CAcreateserial",
            "-out",
            &s(&crt),
            "-days",
            "365",
            "-extfile",
            &s(&ext),
        ],
    );
    let (subject, issuer) = subject_and_issuer(&s(&crt));
    assert_eq!(subject, issuer);

    let d = tmp.path().join("ca");
    let stderr = fails(
        &[
            "init",
            "--dir",
            d.to_str().unwrap(),
            "--import-root",
            &s(&crt),
            "--import-key",
            &s(&key),
        ],
        &[
            &format!("cannot import {}", s(&crt)),
            "not a self-signed root",
            "root certificate is not signed by \"O=Corp, CN=Corp Root\"",
        ],
    );
    assert!(!stderr.contains("names issuer"), "{stderr}");
    assert!(!d.exists(), "a refused import left {d:?} behind");
}
