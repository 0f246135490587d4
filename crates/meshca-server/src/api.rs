//! The HTTP handlers of `/v1`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use meshca_api::{
    CertRequestBody, Endpoint, ImportBody, KeyChoice, RevokeBody, RotateRootBody, TokenRequest,
    TokenRequestBody,
};
use meshca_issuer::{IssueRequest, Issued, check_workload};
use meshca_pki::{Serial, parse_duration, rfc3339, sha256};
use meshca_store::{
    CertFilter, CertStatus, CertificateRecord, RevocationReason, RevokeOutcome, TokenRecord,
    TokenRefusal,
};
use meshca_tls::Peer;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::auth::{Caller, authenticate};
use crate::views::{ca_status_json, record_json};
use crate::{ApiError, AppState};

type S = State<Arc<AppState>>;

/// A query string that does not parse gets the API's JSON error (axum's
/// own rejection is plain text), after authentication.
fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("invalid query string: {}", e.body_text()))
}

async fn caller(state: &AppState, peer: &Peer, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let who = authenticate(state, peer, headers).await?;
    // An agent says which bundle it holds on every call (root rotation).
    if let (Caller::Workload(id), Some(fp)) = (&who, bundle_header(headers)) {
        state.agents.report(&holder(id, peer), fp);
    }
    Ok(who)
}

/// An agent is known by the certificate it holds (`ns/name/serial`), not
/// by its identity: several pods of one identity are several holders, and
/// a root rotation waits for each.
fn holder(id: &meshca_pki::Identity, peer: &Peer) -> String {
    let serial = peer.identity().map_or("", |p| p.serial.as_str());
    format!("{}/{}/{serial}", id.namespace(), id.name())
}

fn bundle_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(crate::agents::BUNDLE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The agents of every replica against the bundle handed out now.
async fn agents_summary(s: &AppState) -> Result<crate::agents::AgentSummary, ApiError> {
    let current = current_bundle_fingerprint(s).await?;
    let mine = format!("agents/{}", s.replica);
    let others: Vec<crate::agents::SharedAgents> = s
        .store
        .list_blobs("agents/")
        .await?
        .into_iter()
        .filter(|(name, _)| *name != mine)
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect();
    Ok(s.agents.summary_with(
        &current,
        &others,
        OffsetDateTime::now_utc().unix_timestamp(),
    ))
}

/// The fingerprint of the bundle the CA hands out now.
async fn current_bundle_fingerprint(s: &AppState) -> Result<String, ApiError> {
    Ok(meshca_pki::bundle_fingerprint(
        &s.authority.issuer().trust_bundle().await?,
    ))
}

/// The answer to `/v1/sign` and `/v1/issue`, serialized straight from the
/// issuance (no intermediate JSON tree: the PEM is the bulk of it).
#[derive(serde::Serialize)]
struct CertAnswer<'a> {
    certificate: &'a str,
    ca_bundle: &'a str,
    serial: &'a Serial,
    not_after: String,
    spiffe_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key: Option<String>,
    /// The id of the last event this replica had seen when the issuance
    /// began: an agent opens its first event stream with it as
    /// `Last-Event-ID`, so that a `rotate` made at any time after its
    /// certificate was issued (before the stream is up too) reaches it.
    last_event_id: String,
}

fn cert_json(issued: &Issued, last_event_id: u64) -> Response {
    let answer = CertAnswer {
        certificate: &issued.certificate_pem,
        ca_bundle: &issued.ca_bundle_pem,
        serial: &issued.record.serial,
        not_after: rfc3339(issued.record.not_after),
        spiffe_id: &issued.record.spiffe_id,
        private_key: issued.private_key.as_ref().map(|k| k.to_pem()),
        last_event_id: last_event_id.to_string(),
    };
    // axum's Json serializes the struct as it is: no JSON tree in between.
    Json(answer).into_response()
}

/// Whom a refusal's audit line is throttled for: a verified certificate
/// names its holder; a token's id is only claimed until the store checked
/// it, so all token callers are one, as are anonymous ones.
fn refusal_key(who: &Caller) -> String {
    match who {
        Caller::Admin | Caller::Workload(_) => who.describe(),
        Caller::Token { .. } => "token".to_owned(),
        Caller::Anonymous => "anonymous".to_owned(),
    }
}

/// Takes one of `identity`'s issuances (`limits.issuances_per_minute`),
/// once the caller is known to be entitled to it; the 429 otherwise.
fn charge_identity(
    state: &AppState,
    bucket: &crate::limits::Rates,
    action: &str,
    who: &Caller,
    identity: &str,
) -> Result<(), ApiError> {
    bucket.take(identity).map_err(|refused| {
        state.metrics.issuance("rate_limited");
        state.limited(
            refused,
            action,
            &who.describe(),
            Some(identity),
            "too many certificates for this identity",
        )
    })
}

/// The 429 of a join token used faster than `limits.token_uses_per_second`.
fn token_limited(
    state: &AppState,
    refused: crate::limits::Refused,
    who: &Caller,
    identity: &str,
) -> ApiError {
    state.metrics.issuance("rate_limited");
    state.limited(
        refused,
        "token-use",
        &who.describe(),
        Some(identity),
        "this join token is used too often",
    )
}

/// `POST /v1/sign` and `POST /v1/issue`.
async fn certificate(
    state: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    body: &Bytes,
    from_csr: bool,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let action = if from_csr { "sign" } else { "issue" };
    // Every refusal is audited, those before the request is understood too.
    let who = match caller(state, peer, headers).await {
        Ok(w) => w,
        Err(e) => {
            // A presented certificate (revoked, expired, foreign) is named
            // and throttled by its serial: its holder proved its key.
            let key = peer.identity().map_or_else(
                || "unauthenticated".to_owned(),
                |p| format!("certificate {}", p.serial),
            );
            state.audit_refusal(action, &key, &key, None, &e);
            state.metrics.issuance(e.code);
            return Err(e);
        }
    };
    let r = match CertRequestBody::from_json(body) {
        Ok(r) => r,
        Err(e) => {
            let e = ApiError::from(e);
            if matches!(who, Caller::Admin | Caller::Workload(_)) {
                state.audit.record(
                    action,
                    &who.describe(),
                    None,
                    None,
                    "refused",
                    Some(&e.message),
                );
            } else {
                state.audit_refusal(action, &who.describe(), &refusal_key(&who), None, &e);
            }
            state.metrics.issuance(e.code);
            return Err(e);
        }
    };
    let identity_text = r.identity_text();
    // A caller proved (a verified certificate, a token whose secret the
    // store checked) has every refusal audited; one not yet proved, whose
    // refusals anyone can cause at will, has them throttled.
    let proven =
        std::sync::atomic::AtomicBool::new(matches!(who, Caller::Admin | Caller::Workload(_)));
    let refuse = |e: ApiError| {
        if proven.load(std::sync::atomic::Ordering::Relaxed) {
            state.audit.record(
                action,
                &who.describe(),
                Some(&identity_text),
                None,
                "refused",
                Some(&e.message),
            );
        } else {
            state.audit_refusal(
                action,
                &who.describe(),
                &refusal_key(&who),
                Some(&identity_text),
                &e,
            );
        }
        state.metrics.issuance(e.code);
        e
    };
    let endpoint = if from_csr {
        Endpoint::Sign
    } else {
        Endpoint::Issue
    };
    let checked = r.validate(endpoint).map_err(|e| refuse(e.into()))?;
    let mut req = IssueRequest::new(checked.identity.namespace(), checked.identity.name())
        .map_err(|e| refuse(e.into()))?
        .dns(checked.dns)
        .ips(checked.ips);
    if let Some(p) = checked.profile {
        req = req.profile(p);
    }
    if let Some(t) = checked.ttl {
        req = req.ttl(Some(t));
    }
    req = match checked.key {
        KeyChoice::Csr(csr) => req.csr(*csr),
        KeyChoice::Generate(kt) => req.generate_key(kt.unwrap_or(state.key_type)),
    };

    // Authorization: the admin may ask for anything within the global limit;
    // a workload or token only for its own identity, within the policy.
    let mut token_used: Option<String> = None;
    match &who {
        Caller::Admin => {}
        Caller::Workload(id) => {
            if !from_csr {
                return Err(refuse(ApiError::forbidden(
                    "a workload renews with /v1/sign and its own CSR",
                )));
            }
            if id != req.identity() {
                return Err(refuse(ApiError::forbidden(format!(
                    "{id} may not obtain a certificate for {identity_text}"
                ))));
            }
            check_workload(&state.rules, &req).map_err(|e| refuse(e.into()))?;
            let presented = peer
                .identity()
                .and_then(|p| p.serial.parse::<Serial>().ok());
            // A certificate's first renewal past half its life is the one
            // its agent makes on schedule: not charged to the identity, so
            // that a sibling renewing in a loop cannot starve it.
            let on_schedule = match &presented {
                Some(serial) => match state.store.get_certificate(serial).await {
                    Ok(rec) => state.renewed.first_on_schedule(
                        &rec.serial.to_hex(),
                        rec.not_before,
                        rec.not_after,
                        OffsetDateTime::now_utc(),
                    ),
                    Err(_) => false,
                },
                None => false,
            };
            // Scheduled renewals have an allowance of their own, as large:
            // a chain of short certificates renewing "on schedule" is
            // bounded too (at most twice the limit in all).
            let bucket = if on_schedule {
                &state.scheduled
            } else {
                &state.issuances
            };
            charge_identity(state, bucket, action, &who, &identity_text)?;
            // The holder of this certificate renews into the new one.
            if let Some(serial) = presented {
                req = req.renewing(serial);
            }
        }
        Caller::Token { id, secret } => {
            check_workload(&state.rules, &req).map_err(|e| refuse(e.into()))?;
            // Before the store is asked: a token used in a loop costs a
            // lookup of memory. Only uses that proved the secret are
            // charged (below), so knowing a token's id is not enough to
            // use up its rate.
            if let Err(refused) = state.token_uses.peek(id) {
                return Err(token_limited(state, refused, &who, &identity_text));
            }
            let hash = sha256(secret.as_bytes());
            let token = match state
                .store
                .consume_token(id, &hash, OffsetDateTime::now_utc())
                .await?
            {
                Ok(t) => t,
                Err(why) => {
                    // An unknown token or a wrong secret proves nothing (the
                    // id is the caller's claim): throttled; an expired or
                    // used-up token was proved by its secret: every one.
                    let unproven = matches!(why, TokenRefusal::Unknown | TokenRefusal::WrongSecret);
                    if !unproven {
                        // The secret matched: the use counts against the
                        // token's rate, so a leaked spent token replayed in
                        // a loop meets it (and its audit lines are bounded
                        // by it: each such refusal is written).
                        proven.store(true, std::sync::atomic::Ordering::Relaxed);
                        if let Err(refused) = state.token_uses.take(id) {
                            return Err(token_limited(state, refused, &who, &identity_text));
                        }
                    }
                    let quiet = if unproven {
                        state.limit_audit.admit_key("token-use", "token")
                    } else {
                        Some(0)
                    };
                    if let Some(quiet) = quiet {
                        state.audit.record(
                            "token-use",
                            &who.describe(),
                            Some(&identity_text),
                            None,
                            "refused",
                            Some(&crate::limits::with_quiet(why.as_str(), quiet)),
                        );
                    }
                    return Err(refuse(ApiError::unauthenticated(
                        "the join token is unknown, expired or used up",
                    )));
                }
            };
            proven.store(true, std::sync::atomic::Ordering::Relaxed);
            if token.namespace != r.namespace || token.name != r.name {
                // Counted against the token's rate: each such request costs
                // a use and its refund.
                let _ = state.token_uses.take(id);
                refund(state, id).await;
                return Err(refuse(ApiError::forbidden(format!(
                    "this join token is for {}/{}, not {identity_text}",
                    token.namespace, token.name
                ))));
            }
            // A token's uses are bounded by the token itself (its uses, and
            // this rate): they are not charged to its identity, so that a
            // pod renewing in a loop cannot keep new pods from joining.
            if let Err(refused) = state.token_uses.take(id) {
                refund(state, id).await;
                return Err(token_limited(state, refused, &who, &identity_text));
            }
            token_used = Some(id.clone());
        }
        Caller::Anonymous => {
            return Err(refuse(ApiError::unauthenticated(
                "present a client certificate (admin, or the identity itself) or `Authorization: Bearer <join token>`",
            )));
        }
    }
    // Read before issuing: every event from here on (a rotate made while
    // the certificate is being issued too) comes after it.
    let last_event_id = state.events.last_id();
    let issued = match state.authority.issue(req).await {
        Ok(i) => i,
        Err(e) => {
            if let Some(id) = &token_used {
                refund(state, id).await;
            }
            return Err(refuse(e.into()));
        }
    };
    let serial = issued.record.serial.to_hex();
    state.audit.record(
        action,
        &who.describe(),
        Some(&identity_text),
        Some(&serial),
        "allowed",
        None,
    );
    if let Some(id) = &token_used {
        state.audit.record(
            "token-use",
            &who.describe(),
            Some(&identity_text),
            Some(&serial),
            "allowed",
            Some(id),
        );
    }
    // The holder is known by its new certificate from now on.
    if let Caller::Workload(id) = &who {
        let fp = bundle_header(headers).unwrap_or_default();
        state.agents.renewed(
            &holder(id, peer),
            &format!("{}/{}/{serial}", id.namespace(), id.name()),
            fp,
        );
    }
    state.metrics.issuance("issued");
    state.metrics.latency(started.elapsed());
    state
        .events
        .publish("issued", Some((&r.namespace, &r.name)), Some(serial));
    Ok(cert_json(&issued, last_event_id))
}

pub async fn sign(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    certificate(&s, &peer, &headers, &body, true).await
}

pub async fn issue(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    certificate(&s, &peer, &headers, &body, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    identity: Option<String>,
    status: Option<String>,
    expiring_within: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// Records per page of `GET /v1/certificates` when none is asked for.
pub const DEFAULT_PAGE: usize = 500;
/// The most records one page may ask for.
pub const MAX_PAGE: usize = 5000;

/// `GET /v1/certificates`: one page, in serial order; `next` is the cursor
/// for the next page (`after`), null when the listing is complete. A page
/// costs what it returns (and the records its filter skips), never the
/// whole store.
pub async fn list(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller(&s, &peer, &headers).await?.require_admin()?;
    let Query(q) = q.map_err(query_error)?;
    let now = OffsetDateTime::now_utc();
    let limit = match q.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit {text:?} must be a number from 1 to {MAX_PAGE}"
                )));
            }
        },
    };
    let after = match q.after.as_deref() {
        None => None,
        Some(text) => Some(text.parse::<Serial>().map_err(|e| {
            ApiError::bad_request(format!(
                "after {text:?} must be a serial (the `next` of the previous page): {e}"
            ))
        })?),
    };
    let mut filter = CertFilter::default();
    if let Some(id) = &q.identity {
        let (ns, name) = id.split_once('/').ok_or_else(|| {
            ApiError::bad_request(format!("identity {id:?} must be namespace/name"))
        })?;
        filter.namespace = Some(ns.to_owned());
        filter.name = Some(name.to_owned());
    }
    match q.status.as_deref() {
        None => {}
        Some("active") => {
            filter.status = Some(CertStatus::Active);
            filter.exclude_expired_before = Some(now);
        }
        Some("revoked") => filter.status = Some(CertStatus::Revoked),
        Some("expired") => {
            filter.status = Some(CertStatus::Active);
            filter.not_after_before = Some(now);
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown status {other:?}: use active, revoked or expired"
            )));
        }
    }
    if let Some(d) = &q.expiring_within {
        let d = parse_duration(d)?;
        filter.status = Some(CertStatus::Active);
        filter.not_after_before = Some(now + d);
        filter.exclude_expired_before = Some(now);
    }
    let page = s
        .store
        .list_certificates_page(&filter, after.as_ref(), limit)
        .await?;
    Ok(Json(json!({
        "certificates": page.records.iter().map(|r| record_json(r, false)).collect::<Vec<_>>(),
        "next": page.next.map(|n| n.to_hex()),
    })))
}

fn parse_serial(text: &str) -> Result<Serial, ApiError> {
    text.parse::<Serial>().map_err(ApiError::from)
}

pub async fn get_certificate(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(serial): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller(&s, &peer, &headers).await?.require_admin()?;
    let r = s.store.get_certificate(&parse_serial(&serial)?).await?;
    Ok(Json(record_json(&r, true)))
}

async fn revoke_one(
    s: &AppState,
    who: &Caller,
    serial: &Serial,
    reason: RevocationReason,
) -> Result<(CertificateRecord, bool), ApiError> {
    let (record, fresh) = match s
        .store
        .revoke_certificate(serial, reason, OffsetDateTime::now_utc())
        .await?
    {
        RevokeOutcome::Revoked(r) => (r, true),
        RevokeOutcome::AlreadyRevoked(r) => (r, false),
    };
    // An upstream CA (Vault) keeps its own CRL: tell it first, so that the
    // CRL remade below includes this serial; also when meshca had the
    // revocation already (a retry after the upstream failed).
    let upstream = s.authority.issuer().revoke(serial).await;
    if fresh {
        let identity = format!("{}/{}", record.namespace, record.name);
        s.audit.record(
            "revoke",
            &who.describe(),
            Some(&identity),
            Some(&serial.to_hex()),
            "allowed",
            Some(reason.as_str()),
        );
    }
    // Also when it was revoked already: a retry after a lost reply, or after
    // a publish that failed, must still reach every replica (the event is
    // idempotent; a replica that misses it anyway re-reads the record within
    // PEER_CACHE_TTL).
    s.peers.mark_revoked(serial);
    s.events.publish(
        "revoked",
        Some((&record.namespace, &record.name)),
        Some(serial.to_hex()),
    );
    s.invalidate_crl();
    if let Err(e) = upstream {
        tracing::warn!(
            "serial {}: revoked in meshca, not upstream: {e}",
            serial.to_hex()
        );
        return Err(ApiError::unavailable(format!(
            "{} is revoked in meshca, but the upstream CA did not take the revocation ({e}); revoke it again to retry",
            serial.to_hex()
        )));
    }
    Ok((record, fresh))
}

pub async fn revoke(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(serial): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&s, &peer, &headers).await?;
    who.require_admin()?;
    let b = RevokeBody::parse(&body)?;
    let reason = match &b.reason {
        Some(r) => r
            .parse::<RevocationReason>()
            .map_err(ApiError::bad_request)?,
        None => RevocationReason::Unspecified,
    };
    let (record, fresh) = revoke_one(&s, &who, &parse_serial(&serial)?, reason).await?;
    let mut v = record_json(&record, false);
    v["already_revoked"] = json!(!fresh);
    Ok(Json(v))
}

async fn current_of(s: &AppState, ns: &str, name: &str) -> Result<CertificateRecord, ApiError> {
    let now = OffsetDateTime::now_utc();
    let filter = CertFilter {
        namespace: Some(ns.to_owned()),
        name: Some(name.to_owned()),
        status: Some(CertStatus::Active),
        exclude_expired_before: Some(now),
        ..Default::default()
    };
    s.store
        .list_certificates(&filter)
        .await?
        .into_iter()
        .max_by_key(|r| r.issued_at)
        .ok_or_else(|| ApiError::not_found(format!("no live certificate for {ns}/{name}")))
}

pub async fn get_identity(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    match caller(&s, &peer, &headers).await? {
        Caller::Admin => {}
        Caller::Workload(id) if id.namespace() == ns && id.name() == name => {}
        other => other.require_admin()?,
    }
    Ok(Json(record_json(&current_of(&s, &ns, &name).await?, true)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnQuery {
    cn: String,
}

pub async fn identity_by_cn(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    q: Result<Query<CnQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller(&s, &peer, &headers).await?.require_admin()?;
    let Query(q) = q.map_err(query_error)?;
    let suffix = format!(".svc.{}", s.authority.policy().trust_domain);
    let (ns, name) =
        q.cn.strip_suffix(&suffix)
            .and_then(|rest| rest.split_once('.'))
            .map(|(name, ns)| (ns.to_owned(), name.to_owned()))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "cn {:?} is not of the form <name>.<namespace>{suffix}",
                    q.cn
                ))
            })?;
    Ok(Json(record_json(&current_of(&s, &ns, &name).await?, true)))
}

pub async fn release_identity(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&s, &peer, &headers).await?;
    who.require_admin()?;
    let filter = CertFilter {
        namespace: Some(ns.clone()),
        name: Some(name.clone()),
        status: Some(CertStatus::Active),
        ..Default::default()
    };
    let mut revoked = Vec::new();
    for r in s.store.list_certificates(&filter).await? {
        revoke_one(&s, &who, &r.serial, RevocationReason::PrivilegeWithdrawn).await?;
        revoked.push(r.serial.to_hex());
    }
    // Its join tokens go too: a released identity gets nothing more.
    for t in s.store.list_tokens().await? {
        if t.namespace == ns && t.name == name {
            let _ = s.store.delete_token(&t.id).await;
        }
    }
    s.audit.record(
        "release",
        &who.describe(),
        Some(&format!("{ns}/{name}")),
        None,
        "allowed",
        None,
    );
    Ok(Json(
        json!({"namespace": ns, "name": name, "revoked": revoked}),
    ))
}

pub async fn rotate_identity(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&s, &peer, &headers).await?;
    who.require_admin()?;
    s.events.publish("rotate", Some((&ns, &name)), None);
    s.audit.record(
        "rotate",
        &who.describe(),
        Some(&format!("{ns}/{name}")),
        None,
        "allowed",
        None,
    );
    Ok(Json(json!({"rotating": [format!("{ns}/{name}")]})))
}

/// Every identity with a live (unexpired, unrevoked) certificate, sorted.
async fn live_identities(s: &AppState) -> Result<Vec<(String, String)>, ApiError> {
    let filter = CertFilter {
        status: Some(CertStatus::Active),
        exclude_expired_before: Some(OffsetDateTime::now_utc()),
        ..Default::default()
    };
    let mut identities: Vec<(String, String)> = s
        .store
        .list_certificates(&filter)
        .await?
        .into_iter()
        .map(|r| (r.namespace, r.name))
        .collect();
    identities.sort();
    identities.dedup();
    Ok(identities)
}

pub async fn rotate_all(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&s, &peer, &headers).await?;
    who.require_admin()?;
    let identities = live_identities(&s).await?;
    for (ns, name) in &identities {
        s.events.publish("rotate", Some((ns, name)), None);
    }
    s.audit
        .record("rotate-all", &who.describe(), None, None, "allowed", None);
    Ok(Json(
        json!({"rotating": identities.iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>()}),
    ))
}

pub async fn bundle(State(s): S) -> Result<Response, ApiError> {
    let pem = s.authority.trust_bundle_pem().await?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

/// How old the served chain of custody may be: it changes only at `ca
/// rotate prepare`, and an agent that misses a new link retries.
const CUSTODY_STALE: Duration = Duration::from_secs(5);

/// The chain of custody of every hierarchy in the bundle (see
/// `meshca_pki::custody`): public, like the bundle; an agent pinned to an
/// earlier root checks each link itself. Served from memory, read from the
/// store at most every CUSTODY_STALE (one lock: concurrent callers wait for
/// one read instead of each reading).
pub async fn custody(State(s): S) -> Result<Response, ApiError> {
    // A new hierarchy (a new link) changes the bundle: read again at once.
    let bundle = s.authority.trust_bundle_pem().await?;
    let mut cached = s.custody.lock().await;
    let pem = match cached.as_ref() {
        Some((at, b, pem)) if at.elapsed() < CUSTODY_STALE && *b == bundle => pem.clone(),
        _ => {
            let pem = read_custody(&s).await?;
            *cached = Some((std::time::Instant::now(), bundle, pem.clone()));
            pem
        }
    };
    drop(cached);
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

async fn read_custody(s: &crate::AppState) -> Result<String, ApiError> {
    let mut pem = String::new();
    for h in s.store.list_hierarchies().await? {
        if h.status == meshca_store::HierarchyStatus::Retired {
            continue;
        }
        for link in &h.custody_pem {
            if !pem.contains(link.as_str()) {
                pem.push_str(link);
            }
        }
    }
    Ok(pem)
}

pub async fn crl(State(s): S, headers: HeaderMap) -> Result<Response, ApiError> {
    let der = s.crl().await?;
    let wants_pem = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-pem-file"));
    if wants_pem {
        Ok((
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            meshca_pki::to_pem("X509 CRL", &der),
        )
            .into_response())
    } else {
        Ok(([(header::CONTENT_TYPE, "application/pkix-crl")], der).into_response())
    }
}

/// Every issuing CA's CRL, PEM, the signing one first: during a rotation's
/// overlap the old hierarchy's certificates are checked against their own
/// issuer's CRL (`openssl verify -crl_check -CRLfile`, GnuTLS
/// `--load-crl`).
pub async fn crls(State(s): S) -> Result<Response, ApiError> {
    let pem: String = s
        .crls()
        .await?
        .iter()
        .map(|d| meshca_pki::to_pem("X509 CRL", d))
        .collect();
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

pub async fn create_token(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller(&s, &peer, &headers).await?;
    who.require_admin()?;
    let TokenRequest {
        identity,
        ttl,
        uses,
    } = TokenRequestBody::parse(&body)?;
    let id = hex::encode(meshca_pki::random_bytes(8)?);
    let secret = hex::encode(meshca_pki::random_bytes(32)?);
    let now = OffsetDateTime::now_utc();
    let record = TokenRecord {
        id: id.clone(),
        secret_sha256: hex::encode(sha256(secret.as_bytes())),
        namespace: identity.namespace().to_owned(),
        name: identity.name().to_owned(),
        created_at: now,
        expires_at: now + ttl,
        uses_allowed: uses,
        uses: 0,
    };
    s.store.create_token(&record).await?;
    s.audit.record(
        "token-create",
        &who.describe(),
        Some(&identity.to_string()),
        None,
        "allowed",
        Some(&id),
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": format!("mct_{id}.{secret}"),
            "id": id,
            "namespace": record.namespace,
            "name": record.name,
            "uses": uses,
            "expires_at": rfc3339(record.expires_at),
            "ca_fingerprint": s.root_fingerprint().await?,
        })),
    ))
}

pub async fn list_tokens(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&s, &peer, &headers).await?.require_admin()?;
    let tokens: Vec<Value> = s
        .store
        .list_tokens()
        .await?
        .iter()
        .map(|t| json!({"id": t.id, "namespace": t.namespace, "name": t.name, "created_at": rfc3339(t.created_at),
                        "expires_at": rfc3339(t.expires_at), "uses": t.uses, "uses_allowed": t.uses_allowed}))
        .collect();
    Ok(Json(json!({"tokens": tokens})))
}

pub async fn delete_token(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = caller(&s, &peer, &headers).await?;
    who.require_admin()?;
    s.store.delete_token(&id).await?;
    s.audit.record(
        "token-delete",
        &who.describe(),
        None,
        None,
        "allowed",
        Some(&id),
    );
    Ok(StatusCode::NO_CONTENT)
}

pub async fn ca_status(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&s, &peer, &headers).await?.require_admin()?;
    let mut status = ca_status_json(&s.authority).await?;
    status["rotation"] = rotation_json(&s).await?;
    status["store"] = json!(s.store.location());
    status["replica"] = json!(s.replica);
    status["leader"] = json!(s.is_leader());
    Ok(Json(status))
}

/// Writes an import's PEMs into a private directory (0700, files 0600) for
/// the checks `init --import-*` runs on files; removed when dropped.
struct Staged(std::path::PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stage_import(
    dir: &std::path::Path,
    b: &ImportBody,
) -> Result<(Staged, meshca_issuer::ImportSpec), ApiError> {
    let nonce = Serial::random()
        .map_err(|e| ApiError::internal(e.to_string()))?
        .to_hex();
    let staged = Staged(dir.join(format!(".import-{}", &nonce[..12])));
    meshca_files::create_private_dir(&staged.0).map_err(|e| ApiError::internal(e.to_string()))?;
    let put = |name: &str, pem: &Option<String>| -> Result<Option<std::path::PathBuf>, ApiError> {
        pem.as_ref()
            .map(|text| {
                let path = staged.0.join(name);
                meshca_files::write_atomic(&path, text.as_bytes(), meshca_files::SECRET_MODE)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                Ok(path)
            })
            .transpose()
    };
    let spec = meshca_issuer::ImportSpec {
        root_cert: put("import.root_cert", &Some(b.root_cert.clone()))?.unwrap_or_default(),
        root_key: put("import.root_key", &b.root_key)?,
        intermediate_cert: put("import.intermediate_cert", &b.intermediate_cert)?,
        intermediate_key: put("import.intermediate_key", &b.intermediate_key)?,
    };
    Ok((staged, spec))
}

/// One step of a root rotation: prepare, activate, retire or abort.
pub async fn rotate_root(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Path(step): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    use meshca_issuer::rotation;
    let who = caller(&s, &peer, &headers).await?;
    who.require_admin()?;
    let b = RotateRootBody::parse(&body)?;
    if s.authority.issuer().kind() != "builtin" {
        return Err(ApiError::from(meshca_issuer::IssuerError::Rotation(
            format!(
                "the CA keys are in {}: rotate there (a new issuer in the mount is followed and announced)",
                s.authority.issuer().describe()
            ),
        )));
    }
    let window = b.window.unwrap_or(Duration::from_secs(60));
    let done = match step.as_str() {
        "prepare" => {
            let key_type = match b.key_type {
                Some(k) => k,
                None => s
                    .authority
                    .issuer()
                    .issuing_key_type()
                    .unwrap_or(s.key_type),
            };
            let staged = b
                .import
                .as_ref()
                .map(|i| stage_import(&s.dir, i))
                .transpose()?;
            let opts = rotation::PrepareOptions {
                trust_domain: s.authority.policy().trust_domain.clone(),
                key_type,
                root_ttl: meshca_pki::DEFAULT_ROOT_TTL,
                import: staged.as_ref().map(|(_, spec)| spec.clone()),
            };
            let record = rotation::prepare(&s.dir, &s.store, s.seal.as_ref(), opts).await?;
            drop(staged);
            format!(
                "prepared hierarchy {}; the trust bundle now holds both roots",
                record.id
            )
        }
        "activate" => {
            let agents = agents_summary(&s).await?;
            if agents.acknowledged < agents.alive && !b.force {
                return Err(ApiError::from(meshca_issuer::IssuerError::Rotation(
                    format!(
                        "{} of {} live agents do not hold the new bundle yet (among them: {}); wait for them, or give --force",
                        agents.alive - agents.acknowledged,
                        agents.alive,
                        agents.lagging.join(", ")
                    ),
                )));
            }
            let (old, new) = rotation::activate(&s.store).await?;
            format!(
                "hierarchy {new} signs now ({old} is retiring); every identity is told to renew within {}",
                meshca_pki::format_duration(window)
            )
        }
        "retire" => {
            let old = rotation::retire(&s.store, b.force).await?;
            format!("hierarchy {old} retired; its root left the trust bundle")
        }
        "abort" => rotation::abort(&s.store).await?,
        "intermediate" => rotation::renew_intermediate(
            &s.dir,
            &s.store,
            s.seal.as_ref(),
            &s.authority.policy().trust_domain,
            true,
        )
        .await?
        .unwrap_or_else(|| "another replica renewed the intermediate meanwhile".into()),
        other => {
            return Err(ApiError::not_found(format!(
                "no rotation step {other:?}: prepare, activate, retire, abort or intermediate"
            )));
        }
    };
    let (signing_before, _) = s.authority.issuer().issuing_ca();
    s.authority.issuer().reload().await?;
    let switched = s.authority.issuer().issuing_ca().0 != signing_before;
    if switched {
        // Another hierarchy signs (activate, or abort after it): the
        // server's own certificate and the local admin credentials move to
        // it now, so that nothing of meshca itself holds up the retirement
        // of the other root, and the operator is not locked out by it.
        s.server_cert_stale
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    // Clients of the new bundle are accepted before the answer goes out.
    crate::apply_bundle(&s).await.map_err(ApiError::internal)?;
    // Agents fetch the bundle, other replicas read the hierarchies again.
    s.events.publish("bundle-changed", None, None);
    if switched && s.dir.join("admin").exists() {
        meshca_issuer::reissue_admin(&s.authority, &s.dir, s.key_type).await?;
    }
    s.audit.record(
        "rotate-root",
        &who.describe(),
        None,
        None,
        "allowed",
        Some(&format!("{step}: {done}")),
    );
    if step == "activate" {
        spread_rotate(&s, window).await?;
    }
    Ok(Json(
        json!({"done": done, "rotation": rotation_json(&s).await?}),
    ))
}

/// The rotation's stage with the agents' acknowledgements of the bundle.
async fn rotation_json(s: &AppState) -> Result<Value, ApiError> {
    let mut v = json!(meshca_issuer::rotation::status(&s.store).await?);
    let agents = agents_summary(s).await?;
    if v["stage"] == "prepared" && agents.acknowledged < agents.alive {
        v["safe_to_continue"] = json!(false);
        v["next"] = json!(format!(
            "activate waits for {} of {} live agents to fetch the new bundle",
            agents.alive - agents.acknowledged,
            agents.alive
        ));
    }
    v["agents"] = json!(agents);
    Ok(v)
}

/// Tells every identity with a live certificate to renew, spread evenly
/// over `window` so that the CA is not asked for everything at once.
async fn spread_rotate(s: &Arc<AppState>, window: Duration) -> Result<(), ApiError> {
    let identities = live_identities(s).await?;
    let st = s.clone();
    tokio::spawn(async move {
        let gap = window / u32::try_from(identities.len().max(1)).unwrap_or(u32::MAX);
        for (ns, name) in identities {
            st.events.publish("rotate", Some((&ns, &name)), None);
            tokio::time::sleep(gap).await;
        }
    });
    Ok(())
}

/// How often an open event stream's caller is authenticated again.
const STREAM_REAUTH: Duration = Duration::from_secs(2);

pub async fn events(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = caller(&s, &peer, &headers).await?;
    let filter: Option<(String, String)> = match &who {
        Caller::Admin => None,
        Caller::Workload(id) => Some((id.namespace().to_owned(), id.name().to_owned())),
        _ => {
            return Err(ApiError::unauthenticated(
                "events need the admin certificate or a workload's own certificate",
            ));
        }
    };
    // A few streams per certificate, and a bound per identity: streams are
    // requests in flight, never closed as idle.
    let slot = match &who {
        Caller::Workload(id) => {
            let serial = peer.identity().map_or("", |p| p.serial.as_str());
            let identity = format!("{}/{}", id.namespace(), id.name());
            match s.streams.open(&identity, serial) {
                Ok(slot) => Some(slot),
                Err(refused) => {
                    return Err(s.limited(
                        refused,
                        "events",
                        &who.describe(),
                        Some(&identity),
                        "too many event streams open",
                    ));
                }
            }
        }
        _ => None,
    };
    let last: Option<u64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    // An agent's open stream keeps it counted as alive (root rotation).
    let guard = match (&who, bundle_header(&headers)) {
        (Caller::Workload(id), Some(fp)) => {
            Some(Arc::new(s.agents.stream_opened(&holder(id, &peer), fp)))
        }
        _ => None,
    };
    let room = slot.as_ref().map(|s| s.closer());
    let sub = s.events.subscribe(
        last,
        filter.as_ref().map(|(ns, n)| (ns.as_str(), n.as_str())),
    );
    let visible =
        move |e: &crate::events::Event| filter.as_ref().is_none_or(|(ns, n)| e.visible_to(ns, n));
    let to_sse = |e: crate::events::Event| {
        Ok::<_, std::convert::Infallible>(
            SseEvent::default()
                .id(e.id.to_string())
                .event(e.kind.clone())
                .json_data(&e)
                .unwrap_or_default(),
        )
    };
    let past = futures_util::stream::iter(sub.reset.into_iter().chain(sub.backlog).map(to_sse));
    let events = s.events.clone();
    let live = tokio_stream::wrappers::BroadcastStream::new(sub.live).filter_map(move |e| {
        let _held = (&guard, &slot);
        let keep = match e {
            Ok(e) => visible(&e).then_some(e),
            // Behind the broadcast: said, so that the client fetches again.
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(_)) => Some(
                crate::events::Event::reset(events.last_id(), crate::events::Missed::Lagged),
            ),
        };
        async move { keep.map(to_sse) }
    });
    // The stream lives only as long as its caller's certificate: it is
    // checked again every STREAM_REAUTH (a revocation seen by this replica
    // marks the cache at once; one it missed is read from the store within
    // PEER_CACHE_TTL), and the stream ends when the check fails.
    let (st, peer2, headers2) = (s.clone(), peer.clone(), headers.clone());
    let reauth = async move {
        loop {
            tokio::time::sleep(STREAM_REAUTH).await;
            if let Err(e) = authenticate(&st, &peer2, &headers2).await {
                tracing::info!(peer = %peer2.describe(), "closing an event stream: {}", e.message);
                break;
            }
        }
    };
    // Closed to make room for a newer stream of the same identity
    // (`limits.event_streams_per_identity`): the client resumes.
    let ended = async move {
        match room {
            Some(close) => {
                tokio::select! {
                    () = reauth => {}
                    () = close.notified() => {}
                }
            }
            None => reauth.await,
        }
    };
    Ok(Sse::new(past.chain(live).take_until(ended))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// How long a store check answers `/readyz` (anonymous: a flood of probes
/// asks the store, etcd, at most once a second).
const READY_STALE: Duration = Duration::from_secs(1);

pub async fn readyz(State(s): S) -> Result<&'static str, ApiError> {
    let arrived = Instant::now();
    let checked = {
        let mut last = s.ready.lock().await;
        match last.as_ref() {
            // A check made while this one waited for the lock answers it
            // (concurrent probes share one); a success stays good a second;
            // a failure is checked again by the next probe to come.
            Some((at, r)) if *at >= arrived || (r.is_ok() && at.elapsed() < READY_STALE) => {
                r.clone()
            }
            _ => {
                let r = s.store.check().await.map_err(|e| e.to_string());
                *last = Some((Instant::now(), r.clone()));
                r
            }
        }
    };
    checked.map_err(|e| ApiError::unavailable(format!("store not ready: {e}")))?;
    let issuer = s.authority.issuer();
    issuer.health().map_err(|p| {
        ApiError::unavailable(format!("issuer not ready ({}): {p}", issuer.describe()))
    })?;
    Ok("ready\n")
}

/// Anonymous: nothing here scans the store per request. The figures over
/// every record come from memory, at most `GAUGES_STALE` old; the
/// hierarchies are a handful of records.
pub async fn metrics(State(s): S) -> Result<Response, ApiError> {
    let now = OffsetDateTime::now_utc();
    let gauges = s.gauges().await?;
    let by_status = gauges.by_status;
    let earliest_leaf = gauges
        .earliest_leaf
        .map(|t| (t - now).as_seconds_f64().max(0.0));
    let hs = s.store.list_hierarchies().await?;
    let live = hs.iter().filter(|h| h.status.in_bundle());
    let root = live
        .clone()
        .map(|h| (h.root_not_after - now).as_seconds_f64())
        .reduce(f64::min);
    let (_, int_after) = s.authority.issuer().issuing_ca();
    let mut text = s.metrics.render(
        &by_status,
        &[
            ("leaf", earliest_leaf),
            ("intermediate", Some((int_after - now).as_seconds_f64())),
            ("root", root),
        ],
    );
    let issuer = s.authority.issuer();
    let (up, reason) = match issuer.health() {
        Ok(()) => (1, "ok"),
        Err(p) => (0, p.label()),
    };
    text.push_str(&format!(
        "# HELP meshca_issuer_up 1 while the issuer can sign; reason says why not.\n# TYPE meshca_issuer_up gauge\nmeshca_issuer_up{{issuer=\"{}\",reason=\"{reason}\"}} {up}\n",
        issuer.kind()
    ));
    text.push_str(&format!(
        "# HELP meshca_leader 1 while this replica leads (runs the scheduled work).\n# TYPE meshca_leader gauge\nmeshca_leader {}\n",
        u8::from(s.is_leader())
    ));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// Gives back a join token's use taken for an issuance that did not happen.
/// A failure here loses that use (the holder may need a new token): said,
/// never silent.
async fn refund(state: &AppState, id: &str) {
    if let Err(e) = state.store.refund_token(id).await {
        tracing::warn!(
            token = id,
            "a use of the join token could not be given back: {e}"
        );
    }
}
