//! `meshca list` and `meshca revoke`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use anyhow::anyhow;
use meshca_pki::{Serial, parse_duration, rfc3339};
use meshca_store::{CertFilter, CertStatus, RevocationReason, RevokeOutcome};
use serde_json::json;
use time::OffsetDateTime;

use crate::store::StoreArgs;
use crate::{ListArgs, RevokeArgs};

pub async fn list(dir: &Path, store_args: &StoreArgs, a: ListArgs) -> anyhow::Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    let within = a
        .expiring_within
        .as_deref()
        .map(parse_duration)
        .transpose()?;
    let status = match a.status.as_deref() {
        None => None,
        Some("active") => Some(CertStatus::Active),
        Some("revoked") => Some(CertStatus::Revoked),
        Some(other) => {
            return Err(anyhow!("unknown --status {other:?}: use active or revoked"));
        }
    };
    let filter = CertFilter {
        namespace: a.namespace,
        name: a.name,
        status: if within.is_some() {
            Some(CertStatus::Active)
        } else {
            status
        },
        not_after_before: within.map(|d| now + d),
        exclude_expired_before: within.map(|_| now),
    };
    let (_, store, _) = super::open_store(dir, store_args).await?;
    let after = a
        .after
        .as_deref()
        .map(str::parse::<meshca_pki::Serial>)
        .transpose()
        .map_err(|e| anyhow!("--after: {e}"))?;
    let records = match (a.limit, &after) {
        (None, None) => store.list_certificates(&filter).await?,
        (Some(0), _) => return Err(anyhow!("--limit must be at least 1")),
        // As online: in serial order, a page at a time.
        (limit, _) => {
            let page = store
                .list_certificates_page(&filter, after.as_ref(), limit.unwrap_or(usize::MAX))
                .await?;
            if let (Some(next), Some(_)) = (&page.next, limit) {
                eprintln!("more certificates follow: --after {next}");
            }
            page.records
        }
    };
    if a.json {
        let rows: Vec<_> = records.iter().map(super::record_json).collect();
        super::print_json(&rows)?;
    } else {
        println!(
            "{:<34} {:<32} {:<9} {:<20} STATUS",
            "SERIAL", "IDENTITY", "PROFILE", "NOT AFTER"
        );
        for r in &records {
            println!(
                "{:<34} {:<32} {:<9} {:<20} {}",
                r.serial,
                format!("{}/{}", r.namespace, r.name),
                r.profile,
                rfc3339(r.not_after),
                r.status_at(now)
            );
        }
        eprintln!("{} certificate(s)", records.len());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn revoke(
    dir: &Path,
    store_args: &StoreArgs,
    issuer_args: &crate::issuer::IssuerArgs,
    a: RevokeArgs,
) -> anyhow::Result<ExitCode> {
    let serial: Serial = a.serial.parse()?;
    let reason: RevocationReason = a.reason.parse().map_err(|e: String| anyhow!(e))?;
    let (config, store, _) = super::open_store(dir, store_args).await?;
    let upstream = issuer_args.choose(config.issuer.as_ref())?;
    let now = OffsetDateTime::now_utc();
    let (record, fresh) = match store.revoke_certificate(&serial, reason, now).await? {
        RevokeOutcome::Revoked(r) => (r, true),
        RevokeOutcome::AlreadyRevoked(r) => (r, false),
    };
    if fresh {
        // Running replicas of a shared store hear of it through the event log
        // (their CRL and their view of client certificates change at once).
        let event = meshca_server::events::Event {
            id: 0,
            kind: "revoked".into(),
            namespace: Some(record.namespace.clone()),
            name: Some(record.name.clone()),
            serial: Some(record.serial.to_hex()),
            at: rfc3339(now),
            reason: None,
        };
        store.append_event(&serde_json::to_vec(&event)?).await?;
    }
    // Vault keeps its own CRL: tell it too (again on a retry).
    if let crate::issuer::IssuerChoice::Vault(settings) = upstream {
        let vault =
            meshca_vault::VaultIssuer::connect(*settings, config.trust_domain.clone()).await?;
        meshca_issuer::Issuer::revoke(&*vault, &serial)
            .await
            .with_context(|| format!("{serial} is revoked in meshca, but Vault did not take it; run the revocation again to retry"))?;
    }
    if a.json {
        super::print_json(&json!({
            "serial": record.serial,
            "namespace": record.namespace,
            "name": record.name,
            "revoked_at": record.revoked_at.map(rfc3339),
            "reason": record.revocation_reason,
            "already_revoked": !fresh,
        }))?;
    } else if fresh {
        println!(
            "Revoked {} ({}/{}), reason {}",
            record.serial, record.namespace, record.name, reason
        );
    } else {
        println!(
            "{} ({}/{}) was already revoked at {}; nothing changed",
            record.serial,
            record.namespace,
            record.name,
            record.revoked_at.map(rfc3339).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `meshca ca status` on a data directory.
pub async fn ca(
    dir: &Path,
    store_args: &StoreArgs,
    issuer_args: &crate::issuer::IssuerArgs,
    c: crate::CaCommand,
) -> anyhow::Result<ExitCode> {
    let crate::CaCommand::Status { json } = c else {
        anyhow::bail!(
            "`meshca ca rotate` talks to the running CA: give --server URL (or MESHCA_SERVER)"
        );
    };
    let (_, authority, _) = super::open_authority(dir, store_args, issuer_args).await?;
    let v = meshca_server::views::ca_status_json(&authority)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    if json {
        super::print_json(&v)?;
    } else {
        print_ca_status(&v);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a `/v1/ca` answer for people.
pub fn print_ca_status(v: &serde_json::Value) {
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
    println!(
        "issuer: {} ({})",
        v["issuer_detail"]
            .as_str()
            .map_or_else(|| s(&v["issuer"]), str::to_owned),
        if v["healthy"] == true {
            "healthy"
        } else {
            "NOT healthy"
        }
    );
    if let Some(problem) = v["issuer_problem"].as_str() {
        println!("issuer problem: {problem}");
    }
    if let Some(root) = v["root_fingerprint"].as_str() {
        println!("root fingerprint: {root}");
    }
    if v["rotation"].is_object() {
        super::online::print_rotation(&v["rotation"]);
    }
    println!("trust domain: {}", s(&v["trust_domain"]));
    println!("issuing CA expires: {}", s(&v["issuing_ca_not_after"]));
    for h in v["hierarchies"].as_array().into_iter().flatten() {
        println!(
            "hierarchy {} [{}] {}: root {} (until {}), intermediate until {}",
            s(&h["id"]),
            s(&h["status"]),
            s(&h["key_type"]),
            s(&h["root_fingerprint"]),
            s(&h["root_not_after"]),
            s(&h["intermediate_not_after"])
        );
    }
}
