//! The records a store holds.

use std::fmt;
use std::str::FromStr;

use meshca_pki::{KeyType, Profile, Serial};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where a CA hierarchy is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HierarchyStatus {
    /// Created and in the trust bundle, not yet signing (rotation: prepared).
    Prepared,
    /// Signs new leaves; in the trust bundle.
    Active,
    /// No longer signs; still in the trust bundle until its leaves are gone.
    Retiring,
    /// Out of the trust bundle.
    Retired,
}

impl HierarchyStatus {
    /// Whether its root belongs in the trust bundle.
    pub fn in_bundle(self) -> bool {
        !matches!(self, HierarchyStatus::Retired)
    }
}

/// A root and intermediate pair. The private keys are in the record only
/// sealed (shared stores); the embedded deployment keeps them in 0600 files
/// next to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HierarchyRecord {
    /// Short unique id, also in the CAs' common names.
    pub id: String,
    /// Where it is in its life.
    pub status: HierarchyStatus,
    /// The root, PEM.
    pub root_pem: String,
    /// The intermediate, PEM.
    pub intermediate_pem: String,
    /// The intermediate's key type (the signature algorithm of leaves).
    pub key_type: KeyType,
    /// Whether the root's key is held (false when only an intermediate was imported).
    pub has_root_key: bool,
    /// When it was created or imported.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The root's notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub root_not_after: OffsetDateTime,
    /// The intermediate's notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub intermediate_not_after: OffsetDateTime,
    /// The CA keys, sealed, when the store is shared by replicas (etcd);
    /// `None` when they are 0600 files next to an embedded store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_keys: Option<SealedKeys>,
    /// The chain of custody to this root (PEM, oldest first): each link is
    /// a root's key certifying the next root's key, made at `ca rotate
    /// prepare`; an agent pinned to an earlier root follows it here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custody_pem: Vec<String>,
}

/// A renewed intermediate for [`crate::Store::replace_intermediate`].
#[derive(Debug, Clone)]
pub struct IntermediateUpdate {
    /// The new intermediate, PEM.
    pub intermediate_pem: String,
    /// Its notAfter.
    pub intermediate_not_after: OffsetDateTime,
    /// Its key sealed (shared stores); `None` next to an embedded store.
    pub sealed_intermediate: Option<String>,
}

/// CA private keys sealed with the replicas' seal key (see
/// `meshca_pki::seal`): base64 of nonce, ciphertext and tag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKeys {
    /// The intermediate's key.
    pub intermediate: String,
    /// The root's key, when held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

impl fmt::Debug for SealedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedKeys(...)")
    }
}

/// Whether a certificate is still good as far as the CA is concerned.
/// (Expiry is not a stored status: it is read from `not_after`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertStatus {
    /// Issued and not revoked.
    Active,
    /// Revoked.
    Revoked,
}

/// RFC 5280 revocation reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum RevocationReason {
    /// No reason given.
    #[default]
    Unspecified,
    /// The key was exposed.
    KeyCompromise,
    /// The CA's key was exposed.
    CaCompromise,
    /// The holder's details changed.
    AffiliationChanged,
    /// Replaced by another certificate.
    Superseded,
    /// No longer needed.
    CessationOfOperation,
    /// The identity was released.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    const ALL: [(RevocationReason, &'static str); 7] = [
        (RevocationReason::Unspecified, "unspecified"),
        (RevocationReason::KeyCompromise, "keyCompromise"),
        (RevocationReason::CaCompromise, "cACompromise"),
        (RevocationReason::AffiliationChanged, "affiliationChanged"),
        (RevocationReason::Superseded, "superseded"),
        (
            RevocationReason::CessationOfOperation,
            "cessationOfOperation",
        ),
        (RevocationReason::PrivilegeWithdrawn, "privilegeWithdrawn"),
    ];

    /// The RFC 5280 name.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(r, _)| *r == self)
            .map_or("unspecified", |(_, n)| n)
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RevocationReason {
    type Err = String;
    /// Case-insensitive, `-` and `_` ignored: `key-compromise` works.
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = |x: &str| x.to_ascii_lowercase().replace(['-', '_'], "");
        let wanted = norm(s);
        Self::ALL
            .iter()
            .find(|(_, n)| norm(n) == wanted)
            .map(|(r, _)| *r)
            .ok_or_else(|| {
                format!(
                    "unknown revocation reason {s:?}: use one of {}",
                    Self::ALL.map(|(_, n)| n).join(", ")
                )
            })
    }
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Serial, lower-case hex.
    pub serial: Serial,
    /// The identity's namespace.
    pub namespace: String,
    /// The identity's name.
    pub name: String,
    /// The profile it was issued for.
    pub profile: Profile,
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<String>,
    /// The leaf's key type.
    pub key_type: KeyType,
    /// The hierarchy that signed it.
    pub hierarchy_id: String,
    /// When it was issued.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// notBefore.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// notAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER, lower-case hex.
    pub fingerprint: String,
    /// Active or revoked.
    pub status: CertStatus,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub revoked_at: Option<OffsetDateTime>,
    /// Why it was revoked.
    #[serde(default)]
    pub revocation_reason: Option<RevocationReason>,
    /// The certificate, PEM (the leaf only).
    pub certificate_pem: String,
    /// The certificate whose holder renewed into this one (authenticated
    /// by it): how a root rotation knows a holder moved on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_from: Option<Serial>,
}

/// What a sweep for expired records reads of a certificate record (its
/// expiry, and its identity: for the index, and to tell whether a newer
/// record supersedes it), without decoding the rest.
#[derive(Deserialize)]
pub(crate) struct Expiry {
    pub(crate) namespace: String,
    pub(crate) name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) not_after: OffsetDateTime,
}

/// The key of a certificate in the identity index: `namespace/name/serial`
/// (names are DNS labels, so `/` cannot occur in them). Every record has
/// one; listing one identity's certificates reads only its keys.
pub(crate) fn identity_key(namespace: &str, name: &str, serial_hex: &str) -> String {
    format!("{namespace}/{name}/{serial_hex}")
}

/// Where an identity's keys in the index start.
pub(crate) fn identity_prefix(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}/")
}

/// The marker that the identity index covers every record (stores made
/// before the index get it built when they are first opened).
pub(crate) const IDENTITY_INDEX_MARKER: &str = "index/identity-v1";

impl CertificateRecord {
    /// `active`, `expired` or `revoked` at `now` (expiry is read from
    /// notAfter, not stored).
    pub fn status_at(&self, now: OffsetDateTime) -> &'static str {
        match self.status {
            CertStatus::Revoked => "revoked",
            CertStatus::Active if self.not_after <= now => "expired",
            CertStatus::Active => "active",
        }
    }
}

/// Which certificates to list. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct CertFilter {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this name.
    pub name: Option<String>,
    /// Only this status.
    pub status: Option<CertStatus>,
    /// Only those whose notAfter is before this (and not yet past when
    /// `exclude_expired_before` is set).
    pub not_after_before: Option<OffsetDateTime>,
    /// Leave out certificates that expired before this instant.
    pub exclude_expired_before: Option<OffsetDateTime>,
}

impl CertFilter {
    /// Whether `r` passes the filter.
    pub fn matches(&self, r: &CertificateRecord) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == r.namespace)
            && self.name.as_ref().is_none_or(|n| *n == r.name)
            && self.status.is_none_or(|s| s == r.status)
            && self.not_after_before.is_none_or(|t| r.not_after < t)
            && self.exclude_expired_before.is_none_or(|t| r.not_after >= t)
    }
}

/// One page of a certificate listing ([`crate::Store::list_certificates_page`]):
/// records in key (serial) order, and where the next page starts.
#[derive(Debug, Clone)]
pub struct CertPage {
    /// The records of this page, in key order.
    pub records: Vec<CertificateRecord>,
    /// The last serial of `records` when more records may follow (the
    /// `after` of the next page); `None` when the listing is complete.
    pub next: Option<Serial>,
}

/// Which expired records the leader's sweep deletes
/// ([`crate::Store::delete_expired_certificates`]).
///
/// A record is *superseded* when its identity (namespace and name) has a
/// newer record (a greater serial key: serials are time-ordered): its holder
/// renewed, or the identity was issued again and again (a flood, a crash
/// loop). Nobody presents a superseded certificate any more, so its record
/// is only history, which the audit log keeps; it goes once it expired
/// before `superseded_expired_before`. The newest record of an identity is
/// what an operator looks at to see why a workload stopped renewing, so it
/// is kept longer, until it expired before `expired_before`.
///
/// Superseded records are kept the shorter time, so
/// `superseded_expired_before` (now − keep superseded) is normally the
/// *later* instant and `expired_before` (now − keep expired) the earlier.
/// Both equal: every record expired before that instant goes, superseded or
/// not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneRule {
    /// The newest record of an identity goes once its notAfter is before this.
    pub expired_before: OffsetDateTime,
    /// A superseded record goes once its notAfter is before this.
    pub superseded_expired_before: OffsetDateTime,
}

impl PruneRule {
    /// Whether a record whose notAfter is `not_after` is deleted,
    /// `superseded` saying whether its identity has a newer record.
    pub fn deletes(&self, not_after: OffsetDateTime, superseded: bool) -> bool {
        if superseded {
            not_after < self.superseded_expired_before
        } else {
            not_after < self.expired_before
        }
    }
}

/// What a revocation did.
#[derive(Debug, Clone)]
pub enum RevokeOutcome {
    /// It is revoked now.
    Revoked(CertificateRecord),
    /// It was revoked before; nothing changed.
    AlreadyRevoked(CertificateRecord),
}

/// A join token: lets one workload get its first certificate for exactly one
/// identity. Only the SHA-256 of the secret is stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public id (the part before the `.` in the token).
    pub id: String,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    /// The identity's namespace.
    pub namespace: String,
    /// The identity's name.
    pub name: String,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// How many certificates it may get.
    pub uses_allowed: u32,
    /// How many it got.
    pub uses: u32,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("expires_at", &self.expires_at)
            .field("uses", &self.uses)
            .field("uses_allowed", &self.uses_allowed)
            .finish_non_exhaustive()
    }
}

/// Why a token was not accepted. The caller gets one message for all of
/// them (an attacker learns nothing); the audit log gets the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token with that id.
    Unknown,
    /// The secret does not match.
    WrongSecret,
    /// Past its expiry.
    Expired,
    /// Every use is spent.
    UsedUp,
}

impl TokenRefusal {
    /// A label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "unknown",
            TokenRefusal::WrongSecret => "wrong_secret",
            TokenRefusal::Expired => "expired",
            TokenRefusal::UsedUp => "used_up",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prune_rule_keeps_the_newest_record_longer() {
        let now = OffsetDateTime::now_utc();
        let hour = time::Duration::hours(1);
        let week = time::Duration::days(7);
        let rule = PruneRule {
            expired_before: now - week,
            superseded_expired_before: now - hour,
        };
        // Expired two hours ago: superseded goes, newest stays.
        let two_hours = time::Duration::hours(2);
        assert!(rule.deletes(now - two_hours, true));
        assert!(!rule.deletes(now - two_hours, false));
        // Expired eight days ago: both go.
        let eight_days = time::Duration::days(8);
        assert!(rule.deletes(now - eight_days, true));
        assert!(rule.deletes(now - eight_days, false));
        // Expired half an hour ago, or not yet: neither goes.
        for not_after in [now - time::Duration::minutes(30), now + hour] {
            assert!(!rule.deletes(not_after, true));
            assert!(!rule.deletes(not_after, false));
        }
        // The cut-offs are exclusive: a notAfter at the instant stays.
        assert!(!rule.deletes(now - hour, true));
        assert!(!rule.deletes(now - week, false));
        assert!(rule.deletes(now - week, true));
    }

    #[test]
    fn a_prune_rule_with_one_instant_is_the_plain_expiry_cut_off() {
        let t = OffsetDateTime::now_utc();
        let rule = PruneRule {
            expired_before: t,
            superseded_expired_before: t,
        };
        for superseded in [false, true] {
            assert!(rule.deletes(t - time::Duration::seconds(1), superseded));
            assert!(!rule.deletes(t, superseded));
            assert!(!rule.deletes(t + time::Duration::seconds(1), superseded));
        }
    }
}
