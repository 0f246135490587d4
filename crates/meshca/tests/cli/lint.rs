//! pkilint (PyPI) lints the root, the intermediate and leaves of every profile
//! and key type. Every finding at WARNING or above must be one the table
//! [`allowed`] gives that kind of certificate (and every finding the table
//! gives must be there); pkilint's exit status must be the number of findings
//! it reported, and its report must show the certificate was decoded and
//! walked. A control certificate made by openssl with two known defects runs
//! first: a pkilint that reports nothing fails the test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use crate::common::*;

/// The severities judged (pkilint's order, FATAL the worst). NOTICE and INFO
/// are not: pkilint reports NOTICE `pkix.unknown_subject_key_identifier_calculation_method`
/// on every meshca certificate (its key identifiers are made by none of the
/// methods pkilint recognizes, RFC 5280's and RFC 7093's, and RFC 5280
/// leaves the method open).
const JUDGED: [&str; 3] = ["FATAL", "ERROR", "WARNING"];

/// One finding in a pkilint report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Finding {
    severity: String,
    code: String,
    /// pkilint's message, `""` when it gives none.
    message: String,
}

/// What a file is, which decides what pkilint may say about it.
#[derive(Debug, Clone)]
enum Kind {
    Root,
    Intermediate,
    /// A leaf whose only URI SAN must be this SPIFFE ID.
    Leaf {
        spiffe: String,
    },
    /// The openssl-made control, with a DNS SAN that is not a domain name and
    /// a keyUsage that is not critical.
    Control {
        bad_dns: &'static str,
    },
}

/// What pkilint must report (and so is allowed to) at WARNING or above for
/// each kind of certificate, and why it is not a defect (or, for the control,
/// why it must be found). Anything else is a failure.
///
/// | kind | finding | why |
/// | --- | --- | --- |
/// | root, intermediate | none | |
/// | leaf | ERROR `pkix.invalid_uri_syntax` naming the leaf's own SPIFFE ID | pkilint checks URIs with the `validators` package's `url()`, which accepts web schemes only (http, https, ftp, ...); `spiffe://<td>/ns/<ns>/sa/<name>` is a valid RFC 3986 URI, all RFC 5280 4.2.1.6 asks of a URI SAN. Only this leaf's own SPIFFE ID is excused: any other URI pkilint finds wrong fails |
/// | control | ERROR `pkix.invalid_domain_name_syntax` naming its DNS SAN, WARNING `pkix.key_usage_extension_not_critical` | the defects put there: a pkilint that misses them checks nothing |
fn allowed(kind: &Kind) -> Vec<Finding> {
    let f = |severity: &str, code: &str, message: String| Finding {
        severity: severity.to_owned(),
        code: code.to_owned(),
        message,
    };
    let mut v = match kind {
        Kind::Root | Kind::Intermediate => vec![],
        Kind::Leaf { spiffe } => vec![f(
            "ERROR",
            "pkix.invalid_uri_syntax",
            format!("Invalid URI syntax: \"{spiffe}\""),
        )],
        Kind::Control { bad_dns } => vec![
            f(
                "ERROR",
                "pkix.invalid_domain_name_syntax",
                format!("Invalid domain name syntax: \"{bad_dns}\""),
            ),
            f(
                "WARNING",
                "pkix.key_usage_extension_not_critical",
                String::new(),
            ),
        ],
    };
    v.sort();
    v
}

/// Validators whose results must be in the report of every file: the first
/// decoding step and the last check pkilint runs, so the whole certificate
/// was decoded and walked.
const ALWAYS_RUN: [&str; 2] = [
    "SubjectPublicKeyDecodingValidator",
    "SignatureAlgorithmMatchValidator",
];

/// Runs `lint_pkix_cert lint -s ALL -f JSON file` and returns its findings
/// at WARNING or above, or why the run does not count as a lint: pkilint's
/// exit status is the number of findings it reported (`clamp_exit_code`,
/// at most 255) and anything else (1 and an empty report when it cannot load
/// the file, 2 for a usage error, 1 and a traceback when it crashes) is a
/// failure; so is a report that is not the JSON this test reads, output on
/// stderr, or a report in which [`ALWAYS_RUN`] (and, for leaves, the DNS name
/// syntax check) did not run.
fn run_pkilint(file: &Path, kind: &Kind) -> Result<Vec<Finding>, String> {
    let out = std::process::Command::new("lint_pkix_cert")
        .args(["lint", "-s", "ALL", "-f", "JSON"])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run lint_pkix_cert (pip install pkilint; ./test.sh does): {e}")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let what = || {
        format!(
            "lint_pkix_cert on {}: {}\nstdout: {stdout}\nstderr: {stderr}",
            file.display(),
            out.status
        )
    };
    let report: serde_json::Value =
        serde_json::from_str(&stdout).map_err(|e| format!("no JSON report ({e}); {}", what()))?;
    let results = report["results"]
        .as_array()
        .ok_or_else(|| format!("no \"results\" array; {}", what()))?;
    let mut all = Vec::new();
    let mut ran = Vec::new();
    for r in results {
        let validator = r["validator"]
            .as_str()
            .ok_or_else(|| format!("a result without a validator: {r}; {}", what()))?;
        ran.push(validator);
        let descriptions = r["finding_descriptions"]
            .as_array()
            .ok_or_else(|| format!("a result without finding_descriptions: {r}; {}", what()))?;
        for d in descriptions {
            let (Some(severity), Some(code)) = (d["severity"].as_str(), d["code"].as_str()) else {
                return Err(format!(
                    "a finding without severity or code: {d}; {}",
                    what()
                ));
            };
            all.push(Finding {
                severity: severity.to_owned(),
                code: code.to_owned(),
                message: d["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
    }
    let want_status = all.len().min(255);
    if out.status.code() != Some(i32::try_from(want_status).unwrap()) {
        return Err(format!(
            "exit status is not the {want_status} findings reported; {}",
            what()
        ));
    }
    if !stderr.trim().is_empty() {
        return Err(format!("pkilint wrote to stderr; {}", what()));
    }
    let mut must_run = ALWAYS_RUN.to_vec();
    if matches!(kind, Kind::Leaf { .. } | Kind::Control { .. }) {
        must_run.push("GeneralNameDnsNameSyntaxValidator");
    }
    for v in must_run {
        if !ran.contains(&v) {
            return Err(format!("{v} did not run; {}", what()));
        }
    }
    let mut judged: Vec<Finding> = all
        .into_iter()
        .filter(|f| JUDGED.contains(&f.severity.as_str()))
        .collect();
    judged.sort();
    Ok(judged)
}

/// Lints `file` and returns what is wrong with the result, if anything.
fn lint(file: &Path, kind: &Kind) -> Option<String> {
    let got = match run_pkilint(file, kind) {
        Ok(got) => got,
        Err(e) => return Some(e),
    };
    let want = allowed(kind);
    (got != want).then(|| {
        format!(
            "{} ({kind:?}): pkilint reported at WARNING or above\n  {got:?}\nthe table allows and requires\n  {want:?}",
            file.display()
        )
    })
}

fn leaf_only(chain: &Path, dest: &Path) {
    let first = split_pem(&std::fs::read_to_string(chain).unwrap()).remove(0);
    std::fs::write(dest, first).unwrap();
}

/// A self-signed leaf by openssl with a DNS SAN that is no domain name and
/// a keyUsage that is not critical.
fn control(dir: &Path) -> (PathBuf, Kind) {
    let bad_dns = "-bad.example";
    let cert = dir.join("control.pem");
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
            dir.join("control.key").to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
            "-subj",
            "/CN=control",
            "-days",
            "1",
            "-addext",
            &format!("subjectAltName=DNS:{bad_dns}"),
            "-addext",
            "keyUsage=digitalSignature",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    (cert, Kind::Control { bad_dns })
}

#[test]
fn pkilint_finds_no_errors() {
    for ca_key in ["ecdsa-p256", "rsa-2048"] {
        let ca = Ca::new(&["--key-type", ca_key]);
        // The control first, with every run: it must be found wanting.
        let mut files = vec![control(ca.tmp.path())];
        let h = ca.hierarchy_dir();
        files.push((h.join("root.crt"), Kind::Root));
        files.push((h.join("intermediate.crt"), Kind::Intermediate));
        let spiffe = |name: &str| format!("spiffe://cluster.local/ns/default/sa/{name}");
        for profile in ["service", "server", "client", "bootstrap", "webhook"] {
            let out = ca.issue(
                "web",
                profile,
                &[
                    "--profile",
                    profile,
                    "--dns",
                    "web.example.com",
                    "--ip",
                    "10.0.0.1",
                ],
            );
            let leaf = ca.path(&format!("{profile}.leaf.pem"));
            leaf_only(&out.join("tls.crt"), &leaf);
            files.push((
                leaf,
                Kind::Leaf {
                    spiffe: spiffe("web"),
                },
            ));
        }
        for kt in ["ecdsa-p384", "ed25519", "rsa-3072"] {
            let out = ca.issue("db", kt, &["--key-type", kt]);
            let leaf = ca.path(&format!("{kt}.leaf.pem"));
            leaf_only(&out.join("tls.crt"), &leaf);
            files.push((
                leaf,
                Kind::Leaf {
                    spiffe: spiffe("db"),
                },
            ));
        }
        assert_eq!(files.len(), 11, "control, root, intermediate, 8 leaves");
        // `ca` (and so the files) lives until the end of this iteration.
        let problems: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .map(|(f, k)| s.spawn(move || lint(f, k)))
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert!(
            problems.is_empty(),
            "CA key {ca_key}:\n{}",
            problems.join("\n\n")
        );
    }
}

/// What pkilint cannot read is a failure of the lint, not a clean file.
#[test]
fn a_file_pkilint_cannot_read_fails_the_lint() {
    let tmp = scratch();
    let (good, kind) = control(tmp.path());
    let pem = std::fs::read_to_string(&good).unwrap();
    let der = der_of(&good);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a certificate", b"hello\n".to_vec()),
        ("empty", Vec::new()),
        // The first base64 character of the body changed: still PEM, but the
        // DER no longer starts with a SEQUENCE.
        ("damaged PEM", {
            let body = pem.find('\n').unwrap() + 1;
            let mut b = pem.clone().into_bytes();
            assert_eq!(b[body], b'M', "a DER SEQUENCE starts with M in base64");
            b[body] = b'A';
            b
        }),
        ("truncated DER", der[..der.len() / 2].to_vec()),
    ];
    for (what, bytes) in cases {
        let f = tmp.path().join("bad.pem");
        std::fs::write(&f, &bytes).unwrap();
        match run_pkilint(&f, &kind) {
            Ok(findings) => panic!("{what}: taken as linted, findings {findings:?}"),
            // pkilint's own words for a file it cannot load, on stderr, with
            // exit status 1 and no report.
            Err(e) => assert!(e.contains("Failed to load certificate"), "{what}: {e}"),
        }
    }
    // The same wrapper accepts the intact control (so the refusals above are
    // about the files, not the wrapper).
    assert_eq!(run_pkilint(&good, &kind).unwrap(), allowed(&kind));
}

/// The DER of a PEM certificate, by openssl.
fn der_of(pem: &Path) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl x509 -outform DER failed");
    out.stdout
}
