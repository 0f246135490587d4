//! Who is calling: the admin, a workload (by its client certificate), the
//! holder of a join token, or nobody.

use http::HeaderMap;
use meshca_issuer::{ADMIN_NAME, ADMIN_NAMESPACE};
use meshca_pki::{Identity, Serial};
use meshca_store::CertStatus;
use meshca_tls::Peer;

use crate::{ApiError, AppState};

/// The authenticated caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin client certificate.
    Admin,
    /// A workload's own, valid, unrevoked client certificate.
    Workload(Identity),
    /// A join token, not yet used (it is consumed where it buys a certificate).
    Token {
        /// The token's public id.
        id: String,
        /// The secret part.
        secret: String,
    },
    /// No credentials.
    Anonymous,
}

impl Caller {
    /// For the audit log.
    pub fn describe(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Workload(id) => format!("workload {id}"),
            Caller::Token { id, .. } => format!("token {id}"),
            Caller::Anonymous => "anonymous".into(),
        }
    }

    /// Refuses everyone but the admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Anonymous => Err(ApiError::unauthenticated(
                "this endpoint needs the admin client certificate (meshca-data/admin/tls.crt)",
            )),
            other => Err(ApiError::forbidden(format!(
                "{} is not the admin",
                other.describe()
            ))),
        }
    }
}

/// Reads the caller from the TLS peer and the Authorization header.
pub async fn authenticate(
    state: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    if let Some(id) = peer.identity() {
        return authenticate_certificate(state, id).await;
    }
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| ApiError::unauthenticated("unreadable Authorization header"))?;
        let token = text.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header must be `Bearer <join token>`")
        })?;
        let (id, secret) = parse_token(token.trim())
            .ok_or_else(|| ApiError::unauthenticated("malformed join token"))?;
        return Ok(Caller::Token {
            id: id.to_owned(),
            secret: secret.to_owned(),
        });
    }
    Ok(Caller::Anonymous)
}

/// A join token is `mct_<id>.<secret>`.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("mct_")?;
    let (id, secret) = rest.split_once('.')?;
    let hexish =
        |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexish(id) && hexish(secret)).then_some((id, secret))
}

/// Who a client certificate is, once it has been matched with its record.
///
/// A serial alone proves nothing: with an imported root, any other CA under
/// that root can mint a certificate with the admin's serial. So the whole
/// presented certificate (its SHA-256) must equal the one this CA recorded
/// when it signed it, and the SPIFFE ID in it must be the record's identity.
/// The fingerprint match also proves that the chain ends in one of meshca's
/// own hierarchies: the exact leaf was signed by meshca's intermediate.
async fn authenticate_certificate(
    state: &AppState,
    id: &meshca_tls::PeerIdentity,
) -> Result<Caller, ApiError> {
    let serial: Serial = id
        .serial
        .parse()
        .map_err(|_| ApiError::unauthenticated("unreadable client certificate serial"))?;
    let not_ours = || {
        ApiError::unauthenticated(format!(
            "client certificate {serial} was not issued by this CA"
        ))
    };
    let revoked = || ApiError::unauthenticated(format!("client certificate {serial} is revoked"));
    // Callers keep their certificate for many requests: what the store said
    // about it is remembered for at most PEER_CACHE_TTL, and revocations
    // (from this replica or, through the event log, any other) mark it at
    // once. The TTL bounds how long a revocation whose event was lost can be
    // missed.
    let known = match state.peers.lookup(&serial) {
        Some(PeerState::Revoked) => return Err(revoked()),
        Some(good @ PeerState::Good { .. }) => good,
        None => {
            let record = match state.store.get_certificate(&serial).await {
                Ok(r) => r,
                Err(e) if e.is_not_found() => return Err(not_ours()),
                Err(e) => return Err(e.into()),
            };
            if record.status == CertStatus::Revoked {
                state.peers.mark_revoked(&serial);
                return Err(revoked());
            }
            // TLS checked validity at the handshake; a connection kept open
            // past notAfter must not keep the identity.
            if record.not_after <= time::OffsetDateTime::now_utc() {
                return Err(ApiError::unauthenticated(format!(
                    "client certificate {serial} has expired"
                )));
            }
            let good = PeerState::Good {
                namespace: record.namespace,
                name: record.name,
                fingerprint: record.fingerprint,
                spiffe_id: record.spiffe_id,
                not_after: record.not_after,
            };
            state.peers.insert(&serial, good.clone());
            good
        }
    };
    let PeerState::Good {
        namespace,
        name,
        fingerprint,
        spiffe_id,
        not_after,
    } = known
    else {
        return Err(revoked());
    };
    // On every request, cached or not: a connection kept open past
    // notAfter must not keep the identity.
    if not_after <= time::OffsetDateTime::now_utc() {
        return Err(ApiError::unauthenticated(format!(
            "client certificate {serial} has expired"
        )));
    }
    if !meshca_pki::constant_time_eq(fingerprint.as_bytes(), id.fingerprint.as_bytes()) {
        tracing::warn!(
            %serial,
            "refused a client certificate whose serial matches a record of this CA but whose contents do not (another CA under the same root?)"
        );
        return Err(not_ours());
    }
    if id.spiffe_id.as_deref() != Some(spiffe_id.as_str()) {
        return Err(ApiError::unauthenticated(format!(
            "client certificate {serial} does not carry the identity it was issued for"
        )));
    }
    if namespace == ADMIN_NAMESPACE && name == ADMIN_NAME {
        return Ok(Caller::Admin);
    }
    let identity = Identity::new(&namespace, &name)?;
    Ok(Caller::Workload(identity))
}

/// What is known about a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Issued by this CA to `namespace/name`, not revoked when last heard of.
    Good {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// SHA-256 of the certificate this CA signed.
        fingerprint: String,
        /// The SPIFFE ID it was issued for.
        spiffe_id: String,
        /// Its notAfter.
        not_after: time::OffsetDateTime,
    },
    /// Revoked.
    Revoked,
}

/// The client certificates seen lately, by serial (bounded in size and age).
#[derive(Debug, Default)]
pub struct PeerCache {
    map: std::sync::Mutex<std::collections::HashMap<Serial, (PeerState, std::time::Instant)>>,
}

/// Most certificates remembered; past that the cache starts over.
const PEER_CACHE_MAX: usize = 100_000;

/// How long a "good" answer of the store is believed without asking again:
/// the bound on how long a revocation can be missed by a replica whose
/// revocation event was lost (a retried revoke, a failed publish, a replica
/// cut off from etcd past the event retention). Revoked stays revoked.
pub const PEER_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl PeerCache {
    /// What is known about `serial` (a "good" older than the TTL is forgotten).
    pub fn lookup(&self, serial: &Serial) -> Option<PeerState> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(serial) {
            Some((PeerState::Revoked, _)) => Some(PeerState::Revoked),
            Some((good, at)) if at.elapsed() < PEER_CACHE_TTL => Some(good.clone()),
            _ => None,
        }
    }

    /// Remembers what the store said.
    pub fn insert(&self, serial: &Serial, state: PeerState) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= PEER_CACHE_MAX {
            // The "good" answers go (they are read again); the revocations
            // stay: with etcd, they are what stands against a replayed
            // record (see SECURITY.md).
            map.retain(|_, (s, _)| *s == PeerState::Revoked);
            if map.len() >= PEER_CACHE_MAX {
                map.clear();
            }
        }
        // A revocation is never overwritten by an older "good".
        if matches!(map.get(serial), Some((PeerState::Revoked, _))) {
            return;
        }
        map.insert(serial.clone(), (state, std::time::Instant::now()));
    }

    /// Marks a certificate revoked.
    pub fn mark_revoked(&self, serial: &Serial) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(
            serial.clone(),
            (PeerState::Revoked, std::time::Instant::now()),
        );
    }
}
