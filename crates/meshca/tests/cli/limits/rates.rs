//! Rates: issuances per identity, uses of a join token, and a `[limits]`
//! table that is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use super::*;
use crate::common::*;
use crate::refusal::api_error;

#[test]
fn issuances_per_identity_are_limited_for_the_workload_and_not_the_admin() {
    const REFUSED: usize = 4;
    let tmp = scratch();
    let d = data_dir(&tmp, "", "issuances_per_minute = 3\n");
    let srv = Server::start(&d, &[]);
    // Its first certificate comes from the admin, which the limit does not
    // count: the workload's three renewals are the identity's three.
    let (api, _) = workload(&srv, tmp.path(), "shop", "api", "api");
    let as_api = cert_args(&api);
    let (csr, _key) = openssl_csr(tmp.path(), "api", &[]);
    let renew = format!(r#"{{"name":"api","namespace":"shop","csr":{csr}}}"#);
    for i in 1..=3 {
        let a = call(&srv, "POST", "/v1/sign", Some(&renew), &as_api, 30);
        assert_eq!(
            a.code, 200,
            "renewal {i} of the 3 a minute allows: {}",
            a.body
        );
    }
    let recorded = serials_of(&srv, "shop/api");
    assert_eq!(recorded.len(), 4, "{recorded:?}");

    // The fourth within the minute, and a few more: each refused, waiting
    // at most the minute out.
    let started = Instant::now();
    for i in 4..4 + REFUSED {
        let why = format!("renewal {i} within a minute");
        let wait = assert_limited(
            &call(&srv, "POST", "/v1/sign", Some(&renew), &as_api, 30),
            "issuances_per_minute",
            &why,
        );
        assert!(
            wait <= 60,
            "{why}: Retry-After {wait} for a per-minute limit"
        );
    }
    let took = started.elapsed();
    assert_eq!(
        serials_of(&srv, "shop/api"),
        recorded,
        "a refused renewal was recorded"
    );
    let lines = limit_refusals_audited(&d, "sign", "workload shop/api", "issuances_per_minute");
    assert_audited_without_flood(&lines, REFUSED, took, "issuances_per_minute");
    assert_eq!(lines[0]["identity"], "shop/api", "{}", lines[0]);
    assert!(limited_total(&srv, "issuances_per_minute") >= 1);

    // Another identity's allowance is its own.
    let (db, _) = workload(&srv, tmp.path(), "shop", "db", "db");
    let (csr, _key) = openssl_csr(tmp.path(), "db", &[]);
    let a = call(
        &srv,
        "POST",
        "/v1/sign",
        Some(&format!(
            r#"{{"name":"db","namespace":"shop","csr":{csr}}}"#
        )),
        &cert_args(&db),
        30,
    );
    assert_eq!(
        a.code, 200,
        "shop/db renewing while shop/api is limited: {}",
        a.body
    );

    // The admin is exempt: it still issues for shop/api, and that one is
    // recorded.
    let issued = admin_issue(&srv, "shop", "api", "");
    let now = serials_of(&srv, "shop/api");
    assert_eq!(now.len(), recorded.len() + 1, "{now:?}");
    assert!(
        now.iter().any(|s| issued["serial"] == s.as_str()),
        "{now:?} lacks {}",
        issued["serial"]
    );
}

#[test]
fn a_join_token_used_faster_than_its_rate_is_refused_and_keeps_its_uses() {
    const USES: u64 = 50;
    const BURST: usize = 5;
    let tmp = scratch();
    let d = data_dir(&tmp, "", "token_uses_per_second = 2\n");
    let srv = Server::start(&d, &[]);
    let created = json(&srv.cli_ok(&["token", "create", "web", "--uses", "50", "--json"]));
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let (csr, _key) = openssl_csr(tmp.path(), "web", &[]);
    let body = format!(r#"{{"name":"web","csr":{csr}}}"#);

    // Five uses at once, of a token allowed two a second.
    let barrier = Barrier::new(BURST);
    let started = Instant::now();
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..BURST)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    call(&srv, "POST", "/v1/sign", Some(&body), &bearer(&token), 30)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed();
    let won = answers.iter().filter(|a| a.code == 200).count();
    let mut refused = 0;
    for a in answers.iter().filter(|a| a.code != 200) {
        let wait = assert_limited(a, "token_uses_per_second", "a use in the burst");
        // A per-second rate: never more than a second or two to wait.
        assert!(wait <= 2, "Retry-After {wait} for a per-second limit");
        refused += 1;
    }
    assert!(
        refused >= 1,
        "{BURST} uses at once of a token allowed 2 a second were all served"
    );
    assert!(won >= 1, "not one use of the burst was served: {answers:?}");

    // The refused ones took no use: the token has 50 less the certificates
    // it bought, which are all that was recorded.
    let (code, listed) = srv.curl("GET", "/v1/tokens", None, &srv.admin());
    assert_eq!(code, 200, "{listed}");
    let tokens = json(&listed);
    let ours = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap_or_else(|| panic!("token {id} is not listed: {listed}"));
    assert_eq!(
        (ours["uses"].as_u64(), ours["uses_allowed"].as_u64()),
        (Some(won as u64), Some(USES)),
        "{won} uses served, {refused} refused: {ours}"
    );
    assert_eq!(serials_of(&srv, "default/web").len(), won);

    let caller = format!("token {id}");
    let lines = limit_refusals_audited(&d, "token-use", &caller, "token_uses_per_second");
    assert_audited_without_flood(&lines, refused, took, "token_uses_per_second");
    assert!(limited_total(&srv, "token_uses_per_second") >= 1);
}

#[test]
fn a_bad_limits_table_is_refused_at_start_naming_the_file_and_the_key() {
    for (limits, needles) in [
        (
            "issuances_per_minute = 0\n",
            ["meshca.toml", "limits.issuances_per_minute"],
        ),
        (
            "events_shared = 0\n",
            ["meshca.toml", "limits.events_shared"],
        ),
        (
            "issuances_per_hour = 5\n",
            ["meshca.toml", "issuances_per_hour"],
        ),
    ] {
        let tmp = scratch();
        let d = data_dir(&tmp, "", limits);
        // An address no one can listen on (TEST-NET-1): a server that took
        // the table would fail on it, not run on, and not with these words.
        fails(
            &[
                "serve",
                "--dir",
                d.to_str().unwrap(),
                "--listen",
                "192.0.2.1:9443",
            ],
            &needles,
        );
    }
}

#[test]
fn a_certificates_first_renewal_past_half_its_life_is_not_charged_to_its_identity() {
    let tmp = scratch();
    let d = data_dir(&tmp, "", "issuances_per_minute = 1\n");
    let srv = Server::start(&d, &[]);
    // A pod whose certificate (6 s) passes half its life in 3 s, and a
    // sibling of the same identity that uses up the identity's allowance.
    let (pod, _) = workload(&srv, tmp.path(), "shop", "api", "pod");
    let (sibling, _) = workload(&srv, tmp.path(), "shop", "api", "sibling");
    let short = tmp.path().join("short");
    srv.cli_ok(&[
        "issue",
        "api",
        "--namespace",
        "shop",
        "--ttl",
        "6s",
        "--out",
        short.to_str().unwrap(),
    ]);
    let (csr, _key) = openssl_csr(tmp.path(), "api", &[]);
    let renew = format!(r#"{{"name":"api","namespace":"shop","csr":{csr}}}"#);
    let a = call(
        &srv,
        "POST",
        "/v1/sign",
        Some(&renew),
        &cert_args(&sibling),
        30,
    );
    assert_eq!(a.code, 200, "the sibling's renewal: {}", a.body);
    let a = call(&srv, "POST", "/v1/sign", Some(&renew), &cert_args(&pod), 30);
    assert_limited(
        &a,
        "issuances_per_minute",
        "an early renewal, the allowance used up",
    );
    // Past half its life, the short certificate's renewal is the one its
    // agent makes on schedule: served although the allowance is used up...
    std::thread::sleep(Duration::from_millis(3500));
    let a = call(
        &srv,
        "POST",
        "/v1/sign",
        Some(&renew),
        &cert_args(&short),
        30,
    );
    assert_eq!(a.code, 200, "a renewal on schedule: {}", a.body);
    // ...once: a second renewal from the same certificate is charged.
    let a = call(
        &srv,
        "POST",
        "/v1/sign",
        Some(&renew),
        &cert_args(&short),
        30,
    );
    assert_limited(
        &a,
        "issuances_per_minute",
        "a second renewal from one certificate",
    );
}

/// `POST /v1/issue` for `default/web` with `auth` (curl arguments).
fn issue_web(srv: &Server, auth: &[String]) -> Answer {
    call(
        srv,
        "POST",
        "/v1/issue",
        Some(r#"{"name":"web"}"#),
        auth,
        10,
    )
}

#[test]
fn a_tokens_rate_is_charged_only_for_uses_that_prove_its_secret() {
    let tmp = scratch();
    let d = data_dir(&tmp, "", "token_uses_per_second = 1\n");
    let srv = Server::start(&d, &[]);
    let token = srv
        .cli_ok(&["token", "create", "web", "--uses", "5"])
        .trim()
        .to_owned();
    // Someone who knows the id (it is in listings and audit lines) and not
    // the secret: refused as unknown, and the token's rate is untouched.
    let (id, _) = token.rsplit_once('.').unwrap();
    let guess = format!("{id}.{}", "0".repeat(64));
    for _ in 0..5 {
        let a = issue_web(&srv, &bearer(&guess));
        assert_eq!(
            api_error(&a.pair(), 401, "unauthenticated", "a guessed secret"),
            "the join token is unknown, expired or used up"
        );
    }
    let a = issue_web(&srv, &bearer(&token));
    assert_eq!(a.code, 200, "the holder, after the guesses: {}", a.body);
    // Anonymous and unknown-token refusals are audited once per 10 s, not
    // once each: 20 more of them write at most one more line.
    let audited = |d: &Path| {
        std::fs::read_to_string(d.join("audit.log"))
            .unwrap()
            .lines()
            .count()
    };
    // (Another id: this token's own rate was just used by its holder.)
    let unknown = format!("mct_{}.{}", "0".repeat(16), "0".repeat(64));
    let before = audited(&d);
    for _ in 0..10 {
        let a = issue_web(&srv, &[]);
        assert_eq!(a.code, 401, "{}", a.body);
        let a = issue_web(&srv, &bearer(&unknown));
        assert_eq!(a.code, 401, "{}", a.body);
    }
    let added = audited(&d) - before;
    assert!(added <= 2, "{added} audit lines for 20 unproven refusals");
}

#[test]
fn a_spent_token_replayed_in_a_loop_meets_its_rate() {
    let tmp = scratch();
    let d = data_dir(&tmp, "", "token_uses_per_second = 1\n");
    let srv = Server::start(&d, &[]);
    let token = srv
        .cli_ok(&["token", "create", "web", "--uses", "1"])
        .trim()
        .to_owned();
    assert_eq!(issue_web(&srv, &bearer(&token)).code, 200);
    // Spent, and replayed: its secret matches, so each try counts against
    // its rate; past it, 429 without the store.
    let codes: Vec<u16> = (0..6)
        .map(|_| issue_web(&srv, &bearer(&token)).code)
        .collect();
    assert!(codes.iter().all(|c| *c == 401 || *c == 429), "{codes:?}");
    assert!(
        codes.iter().filter(|c| **c == 429).count() >= 4,
        "a spent token replayed 6 times at once was limited {codes:?}"
    );
}
