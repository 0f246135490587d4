//! `meshca issue`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use meshca_files::{PUBLIC_MODE, SECRET_MODE, create_private_dir, read_limited, write_set_atomic};
use meshca_issuer::IssueRequest;
use meshca_pki::{
    KeyType, MAX_CSR_BYTES, Profile, format_duration, humanize, parse_csr, parse_duration, rfc3339,
};
use serde_json::json;
use time::OffsetDateTime;

use crate::IssueArgs;
use crate::store::StoreArgs;

pub async fn run(
    dir: &Path,
    store_args: &StoreArgs,
    issuer_args: &crate::issuer::IssuerArgs,
    a: IssueArgs,
) -> anyhow::Result<ExitCode> {
    // Every argument is checked before the CA is touched or a file written.
    if a.out.exists() && !a.out.is_dir() {
        bail!(
            "--out {} is a file; give a directory to write tls.crt, tls.key and ca.crt into",
            a.out.display()
        );
    }
    let profile: Profile = a.profile.parse()?;
    let ttl = a.ttl.as_deref().map(parse_duration).transpose()?;
    let key_type: Option<KeyType> = a.key_type.as_deref().map(str::parse).transpose()?;
    let csr = match &a.csr {
        Some(path) => {
            let bytes = read_limited(path, MAX_CSR_BYTES as u64)
                .with_context(|| format!("reading the CSR {}", path.display()))?;
            Some(parse_csr(&bytes).with_context(|| format!("CSR {}", path.display()))?)
        }
        None => None,
    };
    let mut req = IssueRequest::new(&a.namespace, &a.name)?
        .profile(profile)
        .ttl(ttl)
        .dns(a.dns)
        .ips(a.ips);

    let (config, authority, _) = super::open_authority(dir, store_args, issuer_args).await?;
    req = match csr {
        Some(csr) => req.csr(csr),
        None => req.generate_key(key_type.unwrap_or(config.key_type)),
    };
    let issued = authority.issue(req).await?;

    let key_pem = issued.private_key.as_ref().map(|k| k.to_pem());
    let (crt_path, key_path, ca_path) = write_out(
        &a.out,
        &issued.certificate_pem,
        &issued.ca_bundle_pem,
        key_pem.as_deref(),
    )?;

    let r = &issued.record;
    if issued.clipped {
        eprintln!(
            "warning: the ttl of {} reaches past the issuing CA's own expiry; notAfter was cut to {}",
            format_duration(issued.requested_ttl),
            rfc3339(r.not_after)
        );
    }
    if a.json {
        let mut v = super::record_json(r);
        v["clipped"] = json!(issued.clipped);
        v["files"] = json!({
            "certificate": crt_path,
            "key": issued.private_key.as_ref().map(|_| &key_path),
            "ca_bundle": ca_path,
        });
        super::print_json(&v)?;
    } else {
        let left = (r.not_after - OffsetDateTime::now_utc()).unsigned_abs();
        println!(
            "Issued {} for {}/{} ({}), serial {}",
            r.spiffe_id, r.namespace, r.name, r.profile, r.serial
        );
        println!(
            "  expires {} ({} from now)",
            rfc3339(r.not_after),
            humanize(left)
        );
        println!("  wrote {}", crt_path.display());
        if issued.private_key.is_some() {
            println!("  wrote {} (mode 0600)", key_path.display());
        }
        println!("  wrote {}", ca_path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `tls.crt`, `tls.key` (0600, when there is one) and `ca.crt` into
/// `out`, the key first so that a reader seeing the new certificate finds its
/// key. Returns the three paths.
pub fn write_out(
    out: &Path,
    cert_pem: &str,
    ca_pem: &str,
    key_pem: Option<&str>,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    // A directory meshca creates is 0700 (it holds a key); an existing one
    // keeps the mode its owner gave it.
    if !out.exists() {
        create_private_dir(out)?;
    }
    let key_path = out.join("tls.key");
    let crt_path = out.join("tls.crt");
    let ca_path = out.join("ca.crt");
    if key_pem.is_none() && key_path.exists() {
        eprintln!(
            "warning: {} is from an earlier certificate and does not match the new tls.crt; the CSR's key belongs with it",
            key_path.display()
        );
    }
    // All files switch together, after all of them are safely written.
    let mut files: Vec<(&str, &[u8], u32)> = Vec::new();
    if let Some(key) = key_pem {
        files.push(("tls.key", key.as_bytes(), SECRET_MODE));
    }
    files.push(("tls.crt", cert_pem.as_bytes(), PUBLIC_MODE));
    files.push(("ca.crt", ca_pem.as_bytes(), PUBLIC_MODE));
    write_set_atomic(out, &files)?;
    Ok((crt_path, key_path, ca_path))
}
