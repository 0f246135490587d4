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
    // Callers keep their certificate for many requests: what the store said
    // about it is remembered for at most PEER_CACHE_TTL, and revocations
    // (from this replica or, through the event log, any other) mark it at
    // once. The TTL bounds how long a revocation whose event was lost can be
    // missed.
    let known = match state.peers.lookup(&serial) {
        Some(known) => known,
        None => {
            let record = match state.store.get_certificate(&serial).await {
                Ok(r) => r,
                Err(e) if e.is_not_found() => return Err(not_ours(&serial)),
                Err(e) => return Err(e.into()),
            };
            if record.status == CertStatus::Revoked {
                state.peers.mark_revoked(&serial);
                return Err(revoked(&serial));
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
    identify(&serial, known, id, time::OffsetDateTime::now_utc())
}

fn not_ours(serial: &Serial) -> ApiError {
    ApiError::unauthenticated(format!(
        "client certificate {serial} was not issued by this CA"
    ))
}

fn revoked(serial: &Serial) -> ApiError {
    ApiError::unauthenticated(format!("client certificate {serial} is revoked"))
}

/// The rules, once what is known about `serial` is at hand (from the cache or
/// the store): the caller is who the record says only if the presented
/// certificate is the very one recorded, carries the recorded SPIFFE ID, and
/// is unexpired now (checked on every request, cached or not: a connection
/// kept open past notAfter must not keep the identity).
fn identify(
    serial: &Serial,
    known: PeerState,
    id: &meshca_tls::PeerIdentity,
    now: time::OffsetDateTime,
) -> Result<Caller, ApiError> {
    let PeerState::Good {
        namespace,
        name,
        fingerprint,
        spiffe_id,
        not_after,
    } = known
    else {
        return Err(revoked(serial));
    };
    if not_after <= now {
        return Err(ApiError::unauthenticated(format!(
            "client certificate {serial} has expired"
        )));
    }
    if !meshca_pki::constant_time_eq(fingerprint.as_bytes(), id.fingerprint.as_bytes()) {
        tracing::warn!(
            %serial,
            "refused a client certificate whose serial matches a record of this CA but whose contents do not (another CA under the same root?)"
        );
        return Err(not_ours(serial));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http::StatusCode;
    use time::{Duration, OffsetDateTime};

    const FP: &str = "aa11";
    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn serial(s: &str) -> Serial {
        s.parse().unwrap()
    }

    fn good(ns: &str, name: &str, not_after: OffsetDateTime) -> PeerState {
        PeerState::Good {
            namespace: ns.into(),
            name: name.into(),
            fingerprint: FP.into(),
            spiffe_id: ID.into(),
            not_after,
        }
    }

    fn presented(fingerprint: &str, spiffe_id: Option<&str>) -> meshca_tls::PeerIdentity {
        meshca_tls::PeerIdentity {
            spiffe_id: spiffe_id.map(str::to_owned),
            dns_names: Vec::new(),
            serial: "01ab".into(),
            fingerprint: fingerprint.into(),
        }
    }

    #[track_caller]
    fn refused(r: Result<Caller, ApiError>, status: StatusCode, code: &str, says: &str) {
        let e = r.unwrap_err();
        assert_eq!((e.status, e.code), (status, code), "{e}");
        assert!(e.message.contains(says), "{e}");
    }

    #[test]
    fn the_recorded_certificate_is_its_identity_and_nothing_else_is() {
        let now = OffsetDateTime::now_utc();
        let later = now + Duration::hours(1);
        let s = serial("01ab");
        match identify(
            &s,
            good("shop", "web", later),
            &presented(FP, Some(ID)),
            now,
        ) {
            Ok(Caller::Workload(id)) => assert_eq!(id.to_string(), "shop/web"),
            other => panic!("{other:?}"),
        }
        let admin = good(ADMIN_NAMESPACE, ADMIN_NAME, later);
        assert!(matches!(
            identify(&s, admin.clone(), &presented(FP, Some(ID)), now),
            Ok(Caller::Admin)
        ));
        // Same serial, another certificate (another CA under the same root).
        refused(
            identify(&s, admin.clone(), &presented("aa12", Some(ID)), now),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "was not issued by this CA",
        );
        // The recorded certificate, but not the identity it was recorded for.
        for other in [Some("spiffe://cluster.local/ns/shop/sa/api"), None] {
            refused(
                identify(&s, good("shop", "web", later), &presented(FP, other), now),
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "does not carry the identity",
            );
        }
        // Expired: at notAfter exactly, and after.
        for at in [later, later + Duration::seconds(1)] {
            refused(
                identify(&s, good("shop", "web", later), &presented(FP, Some(ID)), at),
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "has expired",
            );
        }
        // The admin's name in another namespace, or another name in
        // meshca's, is a workload like any other.
        for (ns, name) in [("shop", ADMIN_NAME), (ADMIN_NAMESPACE, "server")] {
            match identify(&s, good(ns, name, later), &presented(FP, Some(ID)), now) {
                Ok(Caller::Workload(id)) => assert_eq!(id.to_string(), format!("{ns}/{name}")),
                other => panic!("{ns}/{name}: {other:?}"),
            }
        }
        refused(
            identify(&s, PeerState::Revoked, &presented(FP, Some(ID)), now),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "is revoked",
        );
    }

    #[test]
    fn only_the_admin_passes_require_admin() {
        assert!(Caller::Admin.require_admin().is_ok());
        let anonymous = Caller::Anonymous.require_admin().unwrap_err();
        assert_eq!(
            (anonymous.status, anonymous.code),
            (StatusCode::UNAUTHORIZED, "unauthenticated")
        );
        for caller in [
            Caller::Workload(Identity::new("shop", "web").unwrap()),
            Caller::Token {
                id: "ab".into(),
                secret: "cd".into(),
            },
        ] {
            let e = caller.require_admin().unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::FORBIDDEN, "forbidden"),
                "{e}"
            );
            assert_eq!(e.message, format!("{} is not the admin", caller.describe()));
        }
        assert_eq!(
            Caller::Workload(Identity::new("shop", "web").unwrap()).describe(),
            "workload shop/web"
        );
        let token = Caller::Token {
            id: "ab".into(),
            secret: "cd".into(),
        };
        assert_eq!(token.describe(), "token ab");
        assert_eq!(Caller::Anonymous.describe(), "anonymous");
        assert_eq!(Caller::Admin.describe(), "admin");
    }

    #[test]
    fn join_tokens_parse_strictly() {
        assert_eq!(parse_token("mct_ab12.cd34"), Some(("ab12", "cd34")));
        let long = "a".repeat(128);
        let token = format!("mct_{long}.{long}");
        assert_eq!(parse_token(&token), Some((long.as_str(), long.as_str())));
        for bad in [
            "ab12.cd34",
            "mct_ab12",
            "mct_.cd34",
            "mct_ab12.",
            "mct_ab1g.cd34",
            "mct_ab12.cd3z",
            "MCT_ab12.cd34",
            &format!("mct_{long}a.cd34"),
            &format!("mct_ab12.{long}a"),
        ] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_peer_cache_never_forgets_a_revocation() {
        let cache = PeerCache::default();
        let (a, b) = (serial("0a"), serial("0b"));
        let later = OffsetDateTime::now_utc() + Duration::hours(1);
        assert_eq!(cache.lookup(&a), None);
        cache.insert(&a, good("shop", "web", later));
        assert_eq!(cache.lookup(&a), Some(good("shop", "web", later)));
        cache.mark_revoked(&a);
        assert_eq!(cache.lookup(&a), Some(PeerState::Revoked));
        // An older "good" read racing the revocation does not undo it.
        cache.insert(&a, good("shop", "web", later));
        assert_eq!(cache.lookup(&a), Some(PeerState::Revoked));
        // Filling the cache drops the good answers, never the revocation.
        cache.insert(&b, good("shop", "api", later));
        // Below the bound, nothing is dropped.
        assert_eq!(cache.lookup(&b), Some(good("shop", "api", later)));
        assert_eq!(cache.lookup(&a), Some(PeerState::Revoked));
        let c = serial("0c");
        cache.insert(&c, good("shop", "cart", later));
        assert_eq!(cache.lookup(&b), Some(good("shop", "api", later)));
        for i in 0..PEER_CACHE_MAX {
            cache.insert(&serial(&format!("{:x}", i + 0x100)), good("x", "y", later));
        }
        assert_eq!(cache.lookup(&a), Some(PeerState::Revoked));
        assert_eq!(cache.lookup(&b), None);
    }

    #[test]
    fn a_good_answer_is_believed_only_for_the_ttl() {
        let cache = PeerCache::default();
        let a = serial("0a");
        let later = OffsetDateTime::now_utc() + Duration::hours(1);
        let old = std::time::Instant::now()
            .checked_sub(PEER_CACHE_TTL)
            .unwrap();
        cache
            .map
            .lock()
            .unwrap()
            .insert(a.clone(), (good("shop", "web", later), old));
        assert_eq!(cache.lookup(&a), None);
        cache
            .map
            .lock()
            .unwrap()
            .insert(a.clone(), (PeerState::Revoked, old));
        assert_eq!(cache.lookup(&a), Some(PeerState::Revoked));
    }
}
