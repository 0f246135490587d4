//! The read-decide-write steps every backend shares. Each takes the record as
//! read (or `None`) and says what to store instead (`None`: nothing changes)
//! and what to answer; the backend makes read and write one atomic step
//! (a redb write transaction, an etcd compare-and-swap), so the rules live
//! here once.

use time::OffsetDateTime;

use crate::{
    CertStatus, CertificateRecord, HierarchyRecord, HierarchyStatus, RevocationReason,
    RevokeOutcome, StoreError, TokenRecord, TokenRefusal,
};

/// What a decision returns: the record to store (if any) and the answer.
pub(crate) type Decision<T, R> = Result<(Option<T>, R), StoreError>;

/// Stores `record` unless something is there already.
pub(crate) fn insert_new<T>(
    kind: &str,
    key: &str,
    current: Option<T>,
    record: T,
) -> Decision<T, ()> {
    match current {
        Some(_) => Err(StoreError::Conflict(format!("{kind} {key} already exists"))),
        None => Ok((Some(record), ())),
    }
}

/// Moves a hierarchy from `from` to `to`.
pub(crate) fn hierarchy_status(
    id: &str,
    current: Option<HierarchyRecord>,
    from: HierarchyStatus,
    to: HierarchyStatus,
) -> Decision<HierarchyRecord, HierarchyRecord> {
    let mut rec = current.ok_or_else(|| StoreError::NotFound {
        kind: "hierarchy",
        key: id.to_owned(),
    })?;
    if rec.status != from {
        return Err(StoreError::Conflict(format!(
            "hierarchy {id} is {:?}, not {from:?}",
            rec.status
        )));
    }
    rec.status = to;
    Ok((Some(rec.clone()), rec))
}

/// A renewed intermediate replaces the one the caller saw, and only it.
pub(crate) fn intermediate_update(
    id: &str,
    current: Option<HierarchyRecord>,
    expected_pem: &str,
    new: &crate::IntermediateUpdate,
) -> Decision<HierarchyRecord, HierarchyRecord> {
    let mut rec = current.ok_or_else(|| StoreError::NotFound {
        kind: "hierarchy",
        key: id.to_owned(),
    })?;
    if rec.intermediate_pem != expected_pem {
        return Err(StoreError::Conflict(format!(
            "hierarchy {id}'s intermediate was replaced meanwhile"
        )));
    }
    rec.intermediate_pem.clone_from(&new.intermediate_pem);
    rec.intermediate_not_after = new.intermediate_not_after;
    if let (Some(sealed), Some(keys)) = (&new.sealed_intermediate, rec.sealed_keys.as_mut()) {
        keys.intermediate.clone_from(sealed);
    }
    Ok((Some(rec.clone()), rec))
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| s.get(2 * i..2 * i + 2))
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect()
}

/// One use of a token: the secret compared in constant time, expiry, uses left.
pub(crate) fn token_use(
    current: Option<TokenRecord>,
    secret_sha256: &[u8; 32],
    now: OffsetDateTime,
) -> Decision<TokenRecord, Result<TokenRecord, TokenRefusal>> {
    let Some(mut rec) = current else {
        return Ok((None, Err(TokenRefusal::Unknown)));
    };
    let stored = hex_bytes(&rec.secret_sha256);
    if !meshca_pki::constant_time_eq(&stored, secret_sha256) {
        return Ok((None, Err(TokenRefusal::WrongSecret)));
    }
    if now >= rec.expires_at {
        return Ok((None, Err(TokenRefusal::Expired)));
    }
    if rec.uses >= rec.uses_allowed {
        return Ok((None, Err(TokenRefusal::UsedUp)));
    }
    rec.uses += 1;
    Ok((Some(rec.clone()), Ok(rec)))
}

/// Gives a use back.
pub(crate) fn token_refund(current: Option<TokenRecord>) -> Decision<TokenRecord, ()> {
    Ok((
        current.map(|mut r| {
            r.uses = r.uses.saturating_sub(1);
            r
        }),
        (),
    ))
}

/// Revokes a certificate once.
pub(crate) fn revocation(
    key: &str,
    current: Option<CertificateRecord>,
    reason: RevocationReason,
    at: OffsetDateTime,
) -> Decision<CertificateRecord, RevokeOutcome> {
    let mut rec = current.ok_or_else(|| StoreError::NotFound {
        kind: "certificate",
        key: key.to_owned(),
    })?;
    if rec.status == CertStatus::Revoked {
        return Ok((None, RevokeOutcome::AlreadyRevoked(rec)));
    }
    rec.status = CertStatus::Revoked;
    rec.revoked_at = Some(at);
    rec.revocation_reason = Some(reason);
    Ok((Some(rec.clone()), RevokeOutcome::Revoked(rec)))
}

/// Sorts certificate records soonest expiry first (then by serial).
pub(crate) fn sort_certificates(out: &mut [CertificateRecord]) {
    out.sort_by(|a, b| a.not_after.cmp(&b.not_after).then(a.serial.cmp(&b.serial)));
}
