//! `meshca inspect`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use meshca_pki::{CertInfo, MAX_CERT_FILE_BYTES, describe, parse_certs, verify_chain};
use serde_json::json;
use time::OffsetDateTime;

use crate::InspectArgs;
use crate::store::StoreArgs;

pub async fn run(
    dir: Option<&Path>,
    store_args: &StoreArgs,
    a: InspectArgs,
) -> anyhow::Result<ExitCode> {
    let (source, bytes) = if a.file == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(MAX_CERT_FILE_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        ("standard input".to_owned(), buf)
    } else {
        let p = PathBuf::from(&a.file);
        let b = meshca_files::read_limited(&p, MAX_CERT_FILE_BYTES as u64)?;
        (p.display().to_string(), b)
    };
    let certs = parse_certs(&bytes).with_context(|| source.clone())?;
    let now = OffsetDateTime::now_utc();
    let infos = certs
        .iter()
        .map(|c| describe(c, now))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| source.clone())?;

    // The bundle to verify against: --ca, else the data directory's.
    let bundle = match (&a.ca, dir) {
        (Some(p), _) => {
            let b = meshca_files::read_limited(p, MAX_CERT_FILE_BYTES as u64)?;
            Some((
                p.display().to_string(),
                parse_certs(&b).with_context(|| p.display().to_string())?,
            ))
        }
        (None, Some(d)) => {
            let (_, store, _) = super::open_store(d, store_args).await?;
            let mut roots = Vec::new();
            for h in store.list_hierarchies().await? {
                if h.status.in_bundle() {
                    roots.extend(parse_certs(h.root_pem.as_bytes())?);
                }
            }
            Some((format!("the trust bundle of {}", d.display()), roots))
        }
        (None, None) => None,
    };
    let verification = bundle.map(|(name, roots)| {
        let result = verify_chain(&certs, &roots, now);
        (name, result)
    });

    if a.json {
        let v = verification.as_ref().map(|(name, r)| {
            json!({"bundle": name, "ok": r.is_ok(), "error": r.as_ref().err().map(ToString::to_string)})
        });
        super::print_json(&json!({"source": source, "certificates": infos, "verification": v}))?;
    } else {
        for (i, info) in infos.iter().enumerate() {
            if infos.len() > 1 {
                println!("Certificate {} of {}", i + 1, infos.len());
            }
            print_info(info);
        }
        if let Some((name, r)) = &verification {
            match r {
                Ok(()) => println!("Chain: verifies against {name}"),
                Err(e) => println!("Chain: does NOT verify against {name}: {e}"),
            }
        }
    }
    Ok(match verification {
        Some((_, Err(_))) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

fn print_info(i: &CertInfo) {
    let row = |k: &str, v: &str| println!("  {k:<14}{v}");
    row("Subject:", &i.subject);
    row("Issuer:", &i.issuer);
    row("Serial:", &i.serial);
    if let Some(id) = &i.spiffe_id {
        row("SPIFFE ID:", id);
    }
    if !i.dns_names.is_empty() {
        row("DNS names:", &i.dns_names.join(", "));
    }
    if !i.ip_addresses.is_empty() {
        row("IPs:", &i.ip_addresses.join(", "));
    }
    let other_uris: Vec<&String> = i
        .uris
        .iter()
        .filter(|u| Some(*u) != i.spiffe_id.as_ref())
        .collect();
    if !other_uris.is_empty() {
        row(
            "URIs:",
            &other_uris
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    row("Key type:", &i.key_type);
    row("Signature:", &i.signature_algorithm);
    let ca = match (i.is_ca, i.path_len) {
        (true, Some(n)) => format!("yes, pathlen {n}"),
        (true, None) => "yes".to_owned(),
        (false, _) => "no".to_owned(),
    };
    row("CA:", &ca);
    if let Some(p) = &i.profile {
        row("Profile:", p);
    }
    row("Key usage:", &i.key_usage.join(", "));
    if !i.extended_key_usage.is_empty() {
        row("Ext usage:", &i.extended_key_usage.join(", "));
    }
    row("Not before:", &i.not_before);
    row("Not after:", &format!("{} ({})", i.not_after, i.time_left));
    row("SHA-256:", &i.fingerprint_sha256);
}
