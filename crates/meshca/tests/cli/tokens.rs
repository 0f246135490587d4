//! Join tokens through their life: a use taken for an issuance that then
//! fails is given back, a deleted token buys nothing, and a token of K uses
//! used by many at once buys exactly K certificates.
//!
//! What `certificate()` in crates/meshca-server/src/api.rs does with a token:
//! the request is checked against policy first (a refusal there takes no
//! use), then one use is consumed (atomically, with the secret and expiry
//! checks); a token of another identity, or an issuance that fails after
//! that, gives the use back (`refund_token`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Barrier};

use serde_json::Value;

use crate::common::*;

const USED_UP: &str = "the join token is unknown, expired or used up";

fn token_id(token: &str) -> String {
    token
        .strip_prefix("mct_")
        .and_then(|t| t.split_once('.'))
        .unwrap_or_else(|| panic!("not a join token: {token:?}"))
        .0
        .to_owned()
}

/// (uses, uses_allowed) of token `id` as the API lists it; `None` when it
/// is not listed.
fn uses(srv: &Server, id: &str) -> Option<(u64, u64)> {
    let (code, body) = srv.curl("GET", "/v1/tokens", None, &srv.admin());
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .map(|t| {
            (
                t["uses"].as_u64().unwrap(),
                t["uses_allowed"].as_u64().unwrap(),
            )
        })
}

/// `(status, error.code, error.message)` of a refusal.
fn refusal(answer: &(u16, String)) -> (u16, String, String) {
    let v: Value = serde_json::from_str(&answer.1)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", answer.0, answer.1));
    (
        answer.0,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn refused(code: u16, error: &str, message: &str) -> (u16, String, String) {
    (code, error.to_owned(), message.to_owned())
}

/// The `token-use` lines of the audit log for token `id`: (outcome, reason).
fn token_uses_audited(data: &Path, id: &str) -> Vec<(String, String)> {
    let caller = format!("token {id}");
    std::fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["action"] == "token-use" && l["caller"] == caller.as_str())
        .map(|l| {
            (
                l["outcome"].as_str().unwrap().to_owned(),
                l["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A /v1/sign body for `name` with `extra` fields (`,"ips":[..]`).
fn sign_body(csr: &str, name: &str, extra: &str) -> String {
    format!(r#"{{"name":"{name}","csr":{csr}{extra}}}"#)
}

#[test]
fn a_use_taken_for_a_failed_issuance_or_a_wrong_identity_is_given_back() {
    let tmp = scratch();
    let data = tmp.path().join("data");
    let srv = Server::start(&data, &[]);
    let (csr, _key) = openssl_csr(tmp.path(), "web", &[]);
    let token = srv.cli_ok(&["token", "create", "web"]).trim().to_owned();
    let id = token_id(&token);
    let auth = bearer(&token);
    let sign = |body: &str| srv.curl("POST", "/v1/sign", Some(body), &auth);
    assert_eq!(uses(&srv, &id), Some((0, 1)));

    // Refused by policy (an extra DNS name no rule allows): checked before
    // the token is consumed, so no use is taken.
    let answer = sign(&sign_body(&csr, "web", r#","dns":["evil.example.com"]"#));
    assert_eq!(
        refusal(&answer),
        refused(
            403,
            "policy",
            "refused by policy: DNS name \"evil.example.com\" is not allowed for default/web, by the default policy (no rule for this identity)"
        )
    );
    assert_eq!(uses(&srv, &id), Some((0, 1)), "a policy refusal took a use");

    // Another identity than the token's: the use taken is given back.
    let answer = sign(&sign_body(&csr, "db", ""));
    assert_eq!(
        refusal(&answer),
        refused(
            403,
            "forbidden",
            "this join token is for default/web, not default/db"
        )
    );
    assert_eq!(
        uses(&srv, &id),
        Some((0, 1)),
        "a token used for another identity lost its use"
    );

    // An issuance that fails after the token was consumed (an IP address
    // that does not parse passes the policy, which skips it, and fails when
    // the authority builds the names): the use is given back.
    let answer = sign(&sign_body(&csr, "web", r#","ips":["not-an-ip"]"#));
    assert_eq!(
        refusal(&answer),
        refused(
            400,
            "bad_request",
            "invalid IP address \"not-an-ip\": expected an IPv4 or IPv6 address such as 10.0.0.1 or ::1"
        )
    );
    assert_eq!(
        uses(&srv, &id),
        Some((0, 1)),
        "a failed issuance kept the token's use"
    );

    // The token still buys its one certificate, and then nothing.
    let (code, body) = sign(&sign_body(&csr, "web", ""));
    assert_eq!(code, 200, "{body}");
    let issued: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        issued["spiffe_id"], "spiffe://cluster.local/ns/default/sa/web",
        "{body}"
    );
    assert_eq!(uses(&srv, &id), Some((1, 1)));
    let answer = sign(&sign_body(&csr, "web", ""));
    assert_eq!(refusal(&answer), refused(401, "unauthenticated", USED_UP));
    assert_eq!(uses(&srv, &id), Some((1, 1)));

    // The audit log saw two uses of the token: the one that bought the
    // certificate and the one refused because it was used up (a refund
    // leaves no `token-use` line: the refusal that caused it has its own).
    assert_eq!(
        token_uses_audited(&data, &id),
        [
            ("allowed".to_owned(), id.clone()),
            ("refused".to_owned(), "used_up".to_owned()),
        ]
    );
}

#[test]
fn a_deleted_token_buys_nothing() {
    let tmp = scratch();
    let data = tmp.path().join("data");
    let srv = Server::start(&data, &[]);
    let (csr, _key) = openssl_csr(tmp.path(), "web", &[]);
    let body = sign_body(&csr, "web", "");
    let token = srv
        .cli_ok(&["token", "create", "web", "--uses", "3"])
        .trim()
        .to_owned();
    let id = token_id(&token);
    // It works: one of its three uses.
    let (code, text) = srv.curl("POST", "/v1/sign", Some(&body), &bearer(&token));
    assert_eq!(code, 200, "{text}");
    assert_eq!(uses(&srv, &id), Some((1, 3)));

    let path = format!("/v1/tokens/{id}");
    let (code, text) = srv.curl("DELETE", &path, None, &srv.admin());
    assert_eq!(code, 204, "{text}");
    assert_eq!(text, "");
    assert_eq!(uses(&srv, &id), None, "the deleted token is still listed");

    // Its two uses left are gone with it, by /v1/sign and by /v1/issue.
    for (endpoint, request) in [
        ("/v1/sign", body.as_str()),
        ("/v1/issue", r#"{"name":"web"}"#),
    ] {
        let answer = srv.curl("POST", endpoint, Some(request), &bearer(&token));
        assert_eq!(
            refusal(&answer),
            refused(401, "unauthenticated", USED_UP),
            "{endpoint}"
        );
    }
    // Deleting it again: it is not there.
    let answer = srv.curl("DELETE", &path, None, &srv.admin());
    assert_eq!(
        refusal(&answer),
        refused(404, "not_found", &format!("no token {id} in the store"))
    );
    // An unknown token proves nothing (anyone can send one at will): its
    // refusals are audited once per 10 s, the next line counting the rest,
    // so the second of these is counted, not written.
    assert_eq!(
        token_uses_audited(&data, &id),
        [
            ("allowed".to_owned(), id.clone()),
            ("refused".to_owned(), "unknown".to_owned()),
        ]
    );
    // Only the certificate bought before the deletion exists.
    let (code, text) = srv.curl(
        "GET",
        "/v1/certificates?identity=default/web",
        None,
        &srv.admin(),
    );
    assert_eq!(code, 200, "{text}");
    let listed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        listed["certificates"].as_array().unwrap().len(),
        1,
        "{text}"
    );
}

#[test]
fn a_token_of_k_uses_used_by_many_at_once_buys_exactly_k_certificates() {
    const USES: usize = 3;
    const CALLERS: usize = 10;
    let tmp = scratch();
    let data = tmp.path().join("data");
    // Ten uses of one token at once: above the default rate per token
    // (limits/rates.rs tests that), which this test is not about.
    init_with(&data, "", "token_uses_per_second = 100\n");
    let srv = Server::start(&data, &[]);
    let (csr, _key) = openssl_csr(tmp.path(), "web", &[]);
    let body = sign_body(&csr, "web", "");
    for round in 0..3 {
        let name = format!("web{round}");
        let body = body.replace(r#""name":"web""#, &format!(r#""name":"{name}""#));
        let token = srv
            .cli_ok(&["token", "create", &name, "--uses", &USES.to_string()])
            .trim()
            .to_owned();
        let id = token_id(&token);
        let barrier = Arc::new(Barrier::new(CALLERS));
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let (barrier, body, auth) = (barrier.clone(), &body, bearer(&token));
                    let srv = &srv;
                    s.spawn(move || {
                        barrier.wait();
                        srv.curl("POST", "/v1/sign", Some(body), &auth)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (won, lost): (Vec<_>, Vec<_>) = answers.iter().partition(|(code, _)| *code == 200);
        assert_eq!(won.len(), USES, "round {round}: {answers:?}");
        // The winners got distinct certificates of the token's identity.
        let mut serials: Vec<String> = won
            .iter()
            .map(|(_, b)| {
                let v: Value = serde_json::from_str(b).unwrap();
                assert_eq!(
                    v["spiffe_id"],
                    format!("spiffe://cluster.local/ns/default/sa/{name}").as_str(),
                    "{b}"
                );
                v["serial"].as_str().unwrap().to_owned()
            })
            .collect();
        serials.sort();
        serials.dedup();
        assert_eq!(serials.len(), USES, "round {round}: {serials:?}");
        // Every loser was told the token is used up, and nothing else.
        for answer in &lost {
            assert_eq!(
                refusal(answer),
                refused(401, "unauthenticated", USED_UP),
                "round {round}"
            );
        }
        assert_eq!(uses(&srv, &id), Some((USES as u64, USES as u64)));
        let audited = token_uses_audited(&data, &id);
        let allowed = audited.iter().filter(|(o, _)| o == "allowed").count();
        let used_up = audited
            .iter()
            .filter(|(o, r)| o == "refused" && r == "used_up")
            .count();
        assert_eq!(
            (allowed, used_up, audited.len()),
            (USES, CALLERS - USES, CALLERS),
            "round {round}: {audited:?}"
        );
        let (code, text) = srv.curl(
            "GET",
            &format!("/v1/certificates?identity=default/{name}"),
            None,
            &srv.admin(),
        );
        assert_eq!(code, 200, "{text}");
        let listed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            listed["certificates"].as_array().unwrap().len(),
            USES,
            "round {round}: {text}"
        );
    }
}
