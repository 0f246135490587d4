//! Revocation checked the way relying parties check it: a CRL counts only
//! once it is signed by the certificate's own issuer, and what it says of a
//! certificate is what openssl (`verify -crl_check`) and GnuTLS (`certtool
//! --verify --load-crl`) conclude from it, not a serial found in its text
//! (its entries are read, for reasons and for certificates already expired,
//! only from a CRL verified first).
//!
//! GnuTLS's `--verify --load-crl` does not check a CRL's signature (a CRL in
//! the issuer's name from any key revokes there, and of several CRLs of one
//! issuer name only the first counts), so each CRL is first verified against
//! its issuer by `certtool --verify-crl` and `openssl crl -CAfile`, and a file
//! must hold exactly one CRL of the issuer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

/// What the CRLs say of a certificate, as openssl and GnuTLS both find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused by both as revoked (openssl: error 23, "certificate revoked").
    Revoked,
    /// Accepted by both, having checked it against its issuer's CRL.
    Good,
}

/// The CRL of `srv` at `path` (`/v1/crl`, DER, or `/v1/crls`, PEM) saved
/// in `to` as PEM; the answer must be a 200 of the endpoint's media type.
pub fn fetch(srv: &Server, path: &str, to: &Path) -> PathBuf {
    let raw = to.with_extension("raw");
    let out = Command::new("curl")
        .args(["-sS", "-o"])
        .arg(&raw)
        .args(["-w", "%{http_code} %{content_type}", "--cacert"])
        .arg(srv.dir.join("admin/ca.crt"))
        .arg(format!("{}{path}", srv.url()))
        .output()
        .unwrap();
    let media = if path == "/v1/crl" {
        "application/pkix-crl"
    } else {
        "application/x-pem-file"
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {media}"),
        "GET {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = as_pem(&raw, to);
    std::fs::remove_file(&raw).unwrap();
    pem
}

/// `crls` as PEM: the file itself when it is PEM, else (one DER CRL) the
/// PEM written to `to`.
fn as_pem(crls: &Path, to: &Path) -> PathBuf {
    if std::fs::read(crls).unwrap().starts_with(b"-----BEGIN") {
        if crls != to {
            std::fs::copy(crls, to).unwrap();
        }
    } else {
        tool(
            "openssl",
            &[
                "crl",
                "-inform",
                "DER",
                "-in",
                crls.to_str().unwrap(),
                "-outform",
                "PEM",
                "-out",
                to.to_str().unwrap(),
            ],
        );
    }
    to.to_owned()
}

/// Runs a real tool whatever its exit status (only not being able to start
/// it fails).
fn run_tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? ./test.sh installs it): {e}")
        })
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An openssl name line (`subject=...`, `issuer=...`) in RFC 2253 form,
/// the form GnuTLS prints names in.
fn name(kind: &str, what: &str, file: &Path) -> String {
    let out = tool(
        "openssl",
        &[
            kind,
            "-in",
            file.to_str().unwrap(),
            "-noout",
            what,
            "-nameopt",
            "RFC2253",
        ],
    );
    let prefix = format!("{}=", what.trim_start_matches('-'));
    out.trim()
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("openssl {kind} {what}: {out}"))
        .to_owned()
}

/// The leaf of a chain's serial as openssl prints it (upper-case hex),
/// the form of `openssl crl -text`.
pub fn serial(chain: &Path) -> String {
    let out = tool(
        "openssl",
        &["x509", "-in", chain.to_str().unwrap(), "-noout", "-serial"],
    );
    out.trim()
        .strip_prefix("serial=")
        .unwrap_or_else(|| panic!("openssl x509 -serial: {out}"))
        .to_owned()
}

/// The certificate that issued the leaf of `chain`: the one among the rest
/// of the chain and the bundle whose subject is the leaf's issuer.
#[derive(Debug)]
struct Issuer {
    file: PathBuf,
    subject: String,
}

fn issuer_of(chain: &Path, bundle: &Path, work: &Path) -> Issuer {
    let wanted = name("x509", "-issuer", chain);
    let chain_text = std::fs::read_to_string(chain).unwrap();
    let bundle_text = std::fs::read_to_string(bundle).unwrap();
    let candidates = split_pem(&chain_text)
        .into_iter()
        .skip(1)
        .chain(split_pem(&bundle_text));
    for (i, pem) in candidates.enumerate() {
        let file = work.join(format!("issuer-{i}.pem"));
        std::fs::write(&file, pem).unwrap();
        if name("x509", "-subject", &file) == wanted {
            return Issuer {
                file,
                subject: wanted,
            };
        }
    }
    panic!(
        "the issuer of {} ({wanted}) is neither in the chain nor in {}",
        chain.display(),
        bundle.display()
    );
}

/// Splits a PEM file of CRLs into their PEM texts.
fn split_crls(text: &str) -> Vec<String> {
    text.split_inclusive("-----END X509 CRL-----\n")
        .filter(|s| s.contains("-----BEGIN X509 CRL-----"))
        .map(|s| s.trim_start().to_owned())
        .collect()
}

/// Whether the CRL in `crl` (one) is signed by `issuer`, by openssl and
/// GnuTLS; `Err` says how each answered when either refuses.
fn signed_by(crl: &Path, issuer: &Issuer) -> Result<(), String> {
    // openssl 3.0 exits 0 even on "verify failure": the words decide.
    let ossl = run_tool(
        "openssl",
        &[
            "crl",
            "-in",
            crl.to_str().unwrap(),
            "-CAfile",
            issuer.file.to_str().unwrap(),
            "-noout",
        ],
    );
    let gnutls = run_tool(
        "certtool",
        &[
            "--verify-crl",
            "--load-ca-certificate",
            issuer.file.to_str().unwrap(),
            "--infile",
            crl.to_str().unwrap(),
        ],
    );
    let ossl_ok = String::from_utf8_lossy(&ossl.stderr).trim() == "verify OK";
    let gnutls_ok = gnutls.status.success()
        && String::from_utf8_lossy(&gnutls.stdout)
            .contains("Verification output: Verified. The certificate is trusted.");
    if ossl_ok && gnutls_ok {
        Ok(())
    } else {
        Err(format!(
            "the CRL {} is not signed by {}:\nopenssl crl -CAfile: {}\ncerttool --verify-crl: {}",
            crl.display(),
            issuer.subject,
            text(&ossl),
            text(&gnutls)
        ))
    }
}

/// The one CRL of `issuer` in `crls` (PEM), written alone to a file, after
/// checking that it is signed by the issuer.
fn issuer_crl(crls: &Path, issuer: &Issuer, work: &Path) -> Result<PathBuf, String> {
    let all = split_crls(&std::fs::read_to_string(crls).unwrap());
    if all.is_empty() {
        return Err(format!("{} holds no CRL", crls.display()));
    }
    let mut own = Vec::new();
    for (i, pem) in all.iter().enumerate() {
        let file = work.join(format!("crl-{i}.pem"));
        std::fs::write(&file, pem).unwrap();
        if name("crl", "-issuer", &file) == issuer.subject {
            own.push(file);
        }
    }
    match own.as_slice() {
        [one] => {
            signed_by(one, issuer)?;
            Ok(one.clone())
        }
        [] => Err(format!(
            "{} holds no CRL of {} (only of other issuers)",
            crls.display(),
            issuer.subject
        )),
        _ => Err(format!(
            "{} holds {} CRLs of {}: one per issuer",
            crls.display(),
            own.len(),
            issuer.subject
        )),
    }
}

/// `openssl verify -crl_check` of the chain's leaf under `bundle`, its
/// intermediates from the chain, with every CRL of `crls`.
fn openssl_verify_crl(chain: &Path, bundle: &Path, crls: &Path) -> Output {
    run_tool(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            bundle.to_str().unwrap(),
            "-untrusted",
            chain.to_str().unwrap(),
            "-CRLfile",
            crls.to_str().unwrap(),
            chain.to_str().unwrap(),
        ],
    )
}

/// openssl's verdict: `verify -crl_check` of the chain under the bundle
/// with every CRL of the file.
fn openssl_verdict(chain: &Path, bundle: &Path, crls: &Path) -> Result<Verdict, String> {
    let out = openssl_verify_crl(chain, bundle, crls);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && stdout.trim() == format!("{}: OK", chain.display()) {
        Ok(Verdict::Good)
    } else if out.status.code() == Some(2)
        && stderr.contains("error 23 at 0 depth lookup: certificate revoked")
    {
        Ok(Verdict::Revoked)
    } else {
        Err(format!("openssl verify -crl_check: {}", text(&out)))
    }
}

/// GnuTLS's verdict: `certtool --verify` of the chain under the bundle with
/// the CRLs, which must say it checked the leaf against its issuer's CRL.
fn gnutls_verdict(
    chain: &Path,
    bundle: &Path,
    crls: &Path,
    issuer: &Issuer,
) -> Result<Verdict, String> {
    let out = run_tool(
        "certtool",
        &[
            "--verify",
            "--load-ca-certificate",
            bundle.to_str().unwrap(),
            "--load-crl",
            crls.to_str().unwrap(),
            "--infile",
            chain.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let checked = stdout.lines().any(|l| {
        let l = l.trim();
        l.starts_with("Checked against CRL[") && l.ends_with(&format!("] of: {}", issuer.subject))
    });
    let verdict = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Chain verification output: "))
        .map(str::trim);
    match (checked, out.status.code(), verdict) {
        (true, Some(0), Some("Verified. The certificate is trusted.")) => Ok(Verdict::Good),
        (
            true,
            Some(1),
            Some("Not verified. The certificate is NOT trusted. The certificate chain is revoked."),
        ) => Ok(Verdict::Revoked),
        _ => Err(format!("certtool --verify --load-crl: {}", text(&out))),
    }
}

/// What `crls` (a file of PEM CRLs, or one DER CRL) says of the leaf of
/// `chain` (PEM, the leaf first, then its intermediates) under `bundle`:
/// the file must hold exactly one CRL of the leaf's issuer, signed by it,
/// and openssl and GnuTLS must agree. `Err` (for polling) explains any
/// other outcome.
pub fn verdict(chain: &Path, bundle: &Path, crls: &Path) -> Result<Verdict, String> {
    let work = tempfile::tempdir().unwrap();
    let crls = as_pem(crls, &work.path().join("crls.pem"));
    let issuer = issuer_of(chain, bundle, work.path());
    issuer_crl(&crls, &issuer, work.path())?;
    let ossl = openssl_verdict(chain, bundle, &crls)?;
    let gnutls = gnutls_verdict(chain, bundle, &crls, &issuer)?;
    if ossl == gnutls {
        Ok(ossl)
    } else {
        Err(format!(
            "openssl finds {} {ossl:?}, GnuTLS {gnutls:?}",
            chain.display()
        ))
    }
}

/// The entries (serial, reason as openssl names it) of the CRL of the
/// leaf's issuer in `crls`, once it is verified to be signed by that issuer.
pub fn entries(chain: &Path, bundle: &Path, crls: &Path) -> Vec<(String, Option<String>)> {
    let work = tempfile::tempdir().unwrap();
    let crls = as_pem(crls, &work.path().join("crls.pem"));
    let issuer = issuer_of(chain, bundle, work.path());
    let own = issuer_crl(&crls, &issuer, work.path()).unwrap_or_else(|e| panic!("{e}"));
    let text = tool(
        "openssl",
        &["crl", "-in", own.to_str().unwrap(), "-noout", "-text"],
    );
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "Revoked Certificates:")
        .skip(1)
        .take_while(|l| !l.starts_with("Signature Algorithm:"))
        .collect();
    let mut entries: Vec<(String, Option<String>)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(s) = line.strip_prefix("Serial Number: ") {
            entries.push((s.to_owned(), None));
        } else if *line == "X509v3 CRL Reason Code:" {
            let last = entries
                .last_mut()
                .unwrap_or_else(|| panic!("a reason before any entry:\n{text}"));
            last.1 = lines.get(i + 1).map(|r| (*r).to_owned());
        }
    }
    entries
}

/// `crls` revokes the leaf of `chain`: openssl and GnuTLS both refuse it as
/// revoked, on the strength of its issuer's CRL, and the entry carries
/// `reason` as openssl names it (`Some("Key Compromise")`; `None`: no
/// reason code, as for `unspecified`).
#[track_caller]
pub fn assert_revoked(chain: &Path, bundle: &Path, crls: &Path, reason: Option<&str>) {
    match verdict(chain, bundle, crls) {
        Ok(Verdict::Revoked) => {}
        other => panic!(
            "{} should be refused as revoked by {}: {other:?}",
            chain.display(),
            crls.display()
        ),
    }
    let serial = serial(chain);
    let listed = entries(chain, bundle, crls);
    let entry = listed.iter().find(|(s, _)| *s == serial);
    assert_eq!(
        entry.map(|(_, r)| r.as_deref()),
        Some(reason),
        "the CRL entry of {serial} (reason): {listed:?}"
    );
}

/// `crls` does not revoke the leaf of `chain`: openssl and GnuTLS both
/// accept it after checking it against its issuer's CRL.
#[track_caller]
pub fn assert_good(chain: &Path, bundle: &Path, crls: &Path) {
    match verdict(chain, bundle, crls) {
        Ok(Verdict::Good) => {}
        other => panic!(
            "{} should pass with {}: {other:?}",
            chain.display(),
            crls.display()
        ),
    }
}

/// `openssl genpkey` arguments for a new key of the kind of `cert`'s (a
/// wrong signature of the right algorithm is what GnuTLS calls invalid; one
/// of another algorithm it reports as a constraint violation).
fn key_like(cert: &Path) -> Vec<String> {
    let text = tool(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"],
    );
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::to_owned)
    };
    match field("Public Key Algorithm: ").as_deref() {
        Some("id-ecPublicKey") => {
            let curve = field("ASN1 OID: ").unwrap_or_else(|| panic!("no curve in {text}"));
            vec![
                "-algorithm".into(),
                "EC".into(),
                "-pkeyopt".into(),
                format!("ec_paramgen_curve:{curve}"),
            ]
        }
        Some("rsaEncryption") => vec![
            "-algorithm".into(),
            "RSA".into(),
            "-pkeyopt".into(),
            "rsa_keygen_bits:2048".into(),
        ],
        Some("ED25519") => vec!["-algorithm".into(), "ED25519".into()],
        other => panic!("a forger's key like {other:?}: {text}"),
    }
}

/// A CRL made with a new key that lists nothing: in the name of the leaf's
/// issuer (`same_name`, without an authority key identifier, so that
/// openssl gets as far as its signature) or of another CA.
fn forge(issuer: &Issuer, same_name: bool, work: &Path) -> PathBuf {
    let p = |f: &str| work.join(f).to_str().unwrap().to_owned();
    let mut genpkey = vec!["genpkey".to_owned()];
    genpkey.extend(key_like(&issuer.file));
    genpkey.extend(["-out".to_owned(), p("forger.key")]);
    tool(
        "openssl",
        &genpkey.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let cert = if same_name {
        // The issuer's certificate, self-signed by the new key: its very name.
        tool(
            "openssl",
            &[
                "x509",
                "-in",
                issuer.file.to_str().unwrap(),
                "-signkey",
                &p("forger.key"),
                "-days",
                "1",
                "-out",
                &p("forger-same.crt"),
            ],
        );
        p("forger-same.crt")
    } else {
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &p("forger.key"),
                "-subj",
                "/O=meshca/OU=cluster.local/CN=not the issuer",
                "-days",
                "1",
                "-out",
                &p("forger-other.crt"),
            ],
        );
        p("forger-other.crt")
    };
    std::fs::write(
        work.join("forger.cnf"),
        "[ca]\ndefault_ca = forger\n[forger]\ndatabase = forger-index.txt\ndefault_md = default\n",
    )
    .unwrap();
    std::fs::write(work.join("forger-index.txt"), "").unwrap();
    let out = work.join(if same_name {
        "forged-same.crl"
    } else {
        "forged-other.crl"
    });
    let made = Command::new("openssl")
        .current_dir(work)
        .args(["ca", "-gencrl", "-config", "forger.cnf", "-keyfile"])
        .arg(p("forger.key"))
        .arg("-cert")
        .arg(cert)
        .args(["-crldays", "1", "-out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl ca -gencrl: {}", text(&made));
    out
}

/// CRLs the issuer of `chain` did not sign are not accepted for it: one in
/// its name from another key (openssl: "CRL signature failure", GnuTLS: the
/// signature is invalid) and one of another CA (openssl: "unable to get
/// certificate CRL", GnuTLS: the issuer is unknown); [`verdict`] refuses
/// both.
#[track_caller]
pub fn assert_forgeries_refused(chain: &Path, bundle: &Path) {
    let work = tempfile::tempdir().unwrap();
    let issuer = issuer_of(chain, bundle, work.path());
    let cases = [
        (
            true,
            "error 8 at 0 depth lookup: CRL signature failure",
            "The signature in the certificate is invalid.",
        ),
        (
            false,
            "error 3 at 0 depth lookup: unable to get certificate CRL",
            "The certificate issuer is unknown.",
        ),
    ];
    for (same_name, openssl_error, gnutls_error) in cases {
        let forged = forge(&issuer, same_name, work.path());
        let out = openssl_verify_crl(chain, bundle, &forged);
        assert!(
            out.status.code() == Some(2)
                && String::from_utf8_lossy(&out.stderr).contains(openssl_error),
            "openssl with {}: {}",
            forged.display(),
            text(&out)
        );
        let out = run_tool(
            "certtool",
            &[
                "--verify-crl",
                "--load-ca-certificate",
                issuer.file.to_str().unwrap(),
                "--infile",
                forged.to_str().unwrap(),
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success()
                && stdout.contains("Verification output: Not verified.")
                && stdout.contains(gnutls_error),
            "certtool --verify-crl with {}: {}",
            forged.display(),
            text(&out)
        );
        // Refused for the reason it is forged: the signature (in the
        // issuer's name), or no CRL of this issuer at all (another's name).
        let refused = verdict(chain, bundle, &forged);
        let reason = if same_name {
            "is not signed by"
        } else {
            "holds no CRL of"
        };
        assert!(
            refused.as_ref().is_err_and(|e| e.contains(reason)),
            "a forged CRL was not refused as such ({reason}) for {}: {refused:?}",
            issuer.subject
        );
    }
}

/// The whole check of the CRLs meshca handed out: `revoked` is refused as
/// revoked (its entry with `reason`), `good`, of the same issuer, passes
/// with the same CRLs, and CRLs from another key or issuer are refused for
/// both.
#[track_caller]
pub fn assert_checks(
    revoked: &Path,
    good: &Path,
    bundle: &Path,
    crls: &Path,
    reason: Option<&str>,
) {
    assert_eq!(
        name("x509", "-issuer", revoked),
        name("x509", "-issuer", good),
        "the control certificate {} has another issuer than {}",
        good.display(),
        revoked.display()
    );
    assert_revoked(revoked, bundle, crls, reason);
    assert_good(good, bundle, crls);
    assert_forgeries_refused(revoked, bundle);
    assert_forgeries_refused(good, bundle);
}
