//! The JSON shapes of records, shared by the API and the CLI's offline
//! commands so that `--json` output is the same with or without `--server`.

use meshca_issuer::Authority;
use meshca_pki::{fingerprint, parse_certs, rfc3339};
use meshca_store::CertificateRecord;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::ApiError;

/// A certificate record; with its PEM when `with_pem`.
pub fn record_json(r: &CertificateRecord, with_pem: bool) -> Value {
    let mut v = json!({
        "serial": r.serial, "namespace": r.namespace, "name": r.name, "profile": r.profile,
        "spiffe_id": r.spiffe_id, "dns_names": r.dns_names, "ip_addresses": r.ip_addresses,
        "key_type": r.key_type, "not_before": rfc3339(r.not_before), "not_after": rfc3339(r.not_after),
        "status": r.status_at(OffsetDateTime::now_utc()), "fingerprint": r.fingerprint,
        "hierarchy_id": r.hierarchy_id, "revoked_at": r.revoked_at.map(rfc3339),
        "revocation_reason": r.revocation_reason,
    });
    if with_pem {
        v["certificate"] = json!(r.certificate_pem);
    }
    v
}

/// The CA's status: issuer, its health, every hierarchy (`GET /v1/ca`).
pub async fn ca_status_json(authority: &Authority) -> Result<Value, ApiError> {
    let now = OffsetDateTime::now_utc();
    let hierarchies: Vec<Value> = authority
        .store()
        .list_hierarchies()
        .await?
        .iter()
        .map(|h| {
            let fp = parse_certs(h.root_pem.as_bytes()).ok().and_then(|c| c.first().map(|d| fingerprint(d)));
            json!({"id": h.id, "status": h.status, "key_type": h.key_type, "root_fingerprint": fp,
                   "root_not_after": rfc3339(h.root_not_after), "intermediate_not_after": rfc3339(h.intermediate_not_after),
                   "created_at": rfc3339(h.created_at)})
        })
        .collect();
    let (_, issuing_not_after) = authority.issuer().issuing_ca();
    let root_fingerprint = authority
        .issuer()
        .trust_bundle()
        .await?
        .first()
        .map(|d| fingerprint(d));
    let health = authority.issuer().health();
    Ok(json!({
        "issuer": authority.issuer().kind(),
        "issuer_detail": authority.issuer().describe(),
        "issuer_health": match &health { Ok(()) => "ok", Err(p) => p.label() },
        "issuer_problem": health.as_ref().err().map(ToString::to_string),
        "healthy": issuing_not_after > now && health.is_ok(),
        "trust_domain": authority.policy().trust_domain,
        "hierarchies": hierarchies,
        "issuing_ca_not_after": rfc3339(issuing_not_after),
        "root_fingerprint": root_fingerprint,
    }))
}
