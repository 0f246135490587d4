#![allow(clippy::unwrap_used)]

use crate::common::*;

#[test]
fn list_and_revoke_work_on_the_store() {
    let ca = Ca::new(&[]);
    assert_eq!(ca.count(), 1, "the admin certificate is recorded");
    ca.issue("web", "web", &[]);
    ca.issue("db", "db", &["--ttl", "1h", "--namespace", "data"]);
    assert_eq!(ca.count(), 3);

    let soon = ok(&["--dir", ca.d(), "list", "--expiring-within", "2h", "--json"]);
    let soon: Vec<serde_json::Value> = serde_json::from_str(&soon).unwrap();
    assert_eq!(soon.len(), 1);
    assert_eq!(soon[0]["name"], "db");
    assert_eq!(soon[0]["namespace"], "data");
    let serial = soon[0]["serial"].as_str().unwrap().to_owned();
    // The serial in the store is the one in the certificate.
    let s = tool(
        "openssl",
        &[
            "x509",
            "-in",
            ca.path("db/tls.crt").to_str().unwrap(),
            "-noout",
            "-serial",
        ],
    );
    assert_eq!(
        s.trim().trim_start_matches("serial=").to_lowercase(),
        serial
    );

    let text = ok(&["--dir", ca.d(), "list"]);
    assert!(
        text.contains("data/db")
            && text.contains("default/web")
            && text.contains("meshca-system/admin"),
        "{text}"
    );

    // Revoke by serial, in openssl's colon form and upper case.
    let colon: String = serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(":");
    let out = ok(&[
        "--dir",
        ca.d(),
        "revoke",
        &colon,
        "--reason",
        "key-compromise",
    ]);
    assert!(
        out.contains("Revoked") && out.contains("keyCompromise"),
        "{out}"
    );
    let again = ok(&["--dir", ca.d(), "revoke", &serial]);
    assert!(again.contains("already revoked"), "{again}");
    let revoked = ok(&["--dir", ca.d(), "list", "--status", "revoked", "--json"]);
    let revoked: Vec<serde_json::Value> = serde_json::from_str(&revoked).unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["revocation_reason"], "keyCompromise");
    // Revoked certificates are not "expiring".
    let soon = ok(&["--dir", ca.d(), "list", "--expiring-within", "2h", "--json"]);
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&soon)
            .unwrap()
            .len(),
        0
    );

    fails(
        &["--dir", ca.d(), "revoke", "00ff00ff"],
        &["no certificate ff00ff"],
    );
    fails(&["--dir", ca.d(), "revoke", "xyz"], &["invalid serial"]);
    fails(
        &["--dir", ca.d(), "revoke", &serial, "--reason", "bored"],
        &["unknown revocation reason", "keyCompromise"],
    );
    fails(
        &["--dir", ca.d(), "list", "--expiring-within", "soon"],
        &["invalid duration \"soon\""],
    );
}

#[test]
fn env_var_selects_the_data_dir() {
    let ca = Ca::new(&[]);
    let out = meshca()
        .env("MESHCA_DIR", ca.d())
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
            .unwrap()
            .len(),
        1
    );
}
