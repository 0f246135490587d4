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
        // The TLS layer verified the chain and validity; the store says
        // whether this CA issued it and whether it was revoked since.
        let serial: Serial = id
            .serial
            .parse()
            .map_err(|_| ApiError::unauthenticated("unreadable client certificate serial"))?;
        // Callers keep their certificate for many requests: what the store
        // said about it is remembered, and revocations (from this replica or,
        // through the event log, any other) mark it at once.
        let (namespace, name) = match state.peers.lookup(&serial) {
            Some(PeerState::Revoked) => {
                return Err(ApiError::unauthenticated(format!(
                    "client certificate {serial} is revoked"
                )));
            }
            Some(PeerState::Good { namespace, name }) => (namespace, name),
            None => {
                let record = match state.store.get_certificate(&serial).await {
                    Ok(r) => r,
                    Err(e) if e.is_not_found() => {
                        return Err(ApiError::unauthenticated(format!(
                            "client certificate {serial} was not issued by this CA"
                        )));
                    }
                    Err(e) => return Err(e.into()),
                };
                if record.status == CertStatus::Revoked {
                    state.peers.mark_revoked(&serial);
                    return Err(ApiError::unauthenticated(format!(
                        "client certificate {serial} is revoked"
                    )));
                }
                state
                    .peers
                    .remember(&serial, &record.namespace, &record.name);
                (record.namespace, record.name)
            }
        };
        if namespace == ADMIN_NAMESPACE && name == ADMIN_NAME {
            return Ok(Caller::Admin);
        }
        let identity = Identity::new(&namespace, &name)?;
        return Ok(Caller::Workload(identity));
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

/// What is known about a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Issued by this CA to `namespace/name`, not revoked when last heard of.
    Good {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Revoked.
    Revoked,
}

/// The client certificates seen lately, by serial (bounded).
#[derive(Debug, Default)]
pub struct PeerCache {
    map: std::sync::Mutex<std::collections::HashMap<Serial, PeerState>>,
}

/// Most certificates remembered; past that the cache starts over.
const PEER_CACHE_MAX: usize = 100_000;

impl PeerCache {
    /// What is known about `serial`.
    pub fn lookup(&self, serial: &Serial) -> Option<PeerState> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(serial)
            .cloned()
    }

    fn insert(&self, serial: &Serial, state: PeerState) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= PEER_CACHE_MAX {
            map.clear();
        }
        // A revocation is never overwritten by an older "good".
        if map.get(serial) == Some(&PeerState::Revoked) {
            return;
        }
        map.insert(serial.clone(), state);
    }

    /// Remembers a good certificate.
    pub fn remember(&self, serial: &Serial, namespace: &str, name: &str) {
        self.insert(
            serial,
            PeerState::Good {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
        );
    }

    /// Marks a certificate revoked.
    pub fn mark_revoked(&self, serial: &Serial) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(serial.clone(), PeerState::Revoked);
    }
}
