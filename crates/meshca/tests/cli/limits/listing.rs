//! Paged listings, and superseded records pruned sooner.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::*;
use crate::common::*;
use crate::events::issue_many;
use crate::refusal::api_error;

/// One page of `GET /v1/certificates?{query}`: its serials and `next`.
fn page(srv: &Server, query: &str) -> (Vec<String>, Option<String>) {
    let (code, body) = srv.curl(
        "GET",
        &format!("/v1/certificates?{query}"),
        None,
        &srv.admin(),
    );
    assert_eq!(code, 200, "?{query}: {body}");
    let v = json(&body);
    assert!(
        v.as_object().is_some_and(|o| o.contains_key("next")),
        "?{query}: no next: {body}"
    );
    let serials = v["certificates"]
        .as_array()
        .unwrap_or_else(|| panic!("?{query}: {body}"))
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect();
    let next = match &v["next"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("?{query}: next is {other}"),
    };
    (serials, next)
}

/// A serial's place in serial order: serials are minimal hex, so the longer
/// is the larger, and among equally long ones the text orders them.
fn serial_order(s: &str) -> (usize, String) {
    (s.len(), s.to_ascii_lowercase())
}

fn ascending(serials: &[String]) -> bool {
    serials
        .windows(2)
        .all(|w| serial_order(&w[0]) < serial_order(&w[1]))
}

/// Every page of `limit` from the start, following `next`: all but the last
/// full, the last with `next` null.
fn walk(srv: &Server, limit: usize) -> Vec<String> {
    let mut all = Vec::new();
    let mut query = format!("limit={limit}");
    for _ in 0..10_000 {
        let (serials, next) = page(srv, &query);
        assert!(
            serials.len() <= limit,
            "?{query}: {} records",
            serials.len()
        );
        all.extend(serials.iter().cloned());
        // (A full last page may have a next, and the page after it is
        // empty, with none.)
        let Some(next) = next else {
            return all;
        };
        assert_eq!(
            serials.len(),
            limit,
            "?{query}: a page short of the limit has a next"
        );
        query = format!("limit={limit}&after={next}");
    }
    panic!("no end to the pages of {limit}");
}

#[test]
fn certificate_listings_are_paged_in_serial_order() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    // What the store holds already: the admin's and the server's
    // certificates, one page.
    let (before, next) = page(&srv, "");
    assert_eq!(next, None, "{before:?}");
    assert!(
        !before.is_empty() && ascending(&before),
        "not in serial order: {before:?}"
    );
    let mut mine: Vec<String> = (0..7)
        .map(|_| {
            admin_issue(&srv, "default", "paged", "")["serial"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    mine.sort_by_key(|s| serial_order(s));
    // Leaf serials begin with the time of issuance: these come after every
    // serial there was.
    let last_before = before.last().unwrap().clone();
    assert!(
        serial_order(&mine[0]) > serial_order(&last_before),
        "{mine:?} after {last_before}"
    );

    // After the last serial there was, in pages of 3: 3, 3, 1, each in
    // serial order, with next null at the end.
    let mut sizes = Vec::new();
    let mut got = Vec::new();
    let mut after = last_before;
    loop {
        assert!(sizes.len() < 3, "more than 3 pages of 3 for 7: {sizes:?}");
        let (serials, next) = page(&srv, &format!("limit=3&after={after}"));
        sizes.push(serials.len());
        got.extend(serials);
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(got, mine, "the 7 once each, in serial order");

    // From the start, in pages of 3, and in one page of the most (5000):
    // every record once, in serial order.
    let mut all = [before, mine].concat();
    all.sort_by_key(|s| serial_order(s));
    assert_eq!(walk(&srv, 3), all);
    assert_eq!(page(&srv, "limit=5000"), (all.clone(), None));

    // Bad paging: 400 naming the parameter.
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=5001", "limit"),
        ("limit=abc", "limit"),
        ("after=zz", "after"),
        ("limit=3&after=not-a-serial", "after"),
    ] {
        let answer = srv.curl(
            "GET",
            &format!("/v1/certificates?{query}"),
            None,
            &srv.admin(),
        );
        let message = api_error(&answer, 400, "bad_request", &format!("?{query}"));
        assert!(
            message.contains(param),
            "?{query}: the message does not name {param}: {message}"
        );
    }

    // Past one default page (500): the default page is 500 with a next, and
    // the online `meshca list` follows the pages to the end.
    let bulk: Vec<String> = (0..500).map(|i| format!("bulk{i}")).collect();
    issue_many(&srv, tmp.path(), &bulk);
    let (everything, next) = page(&srv, "limit=5000");
    assert_eq!(next, None);
    assert_eq!(everything.len(), all.len() + bulk.len());
    assert!(ascending(&everything), "not in serial order");
    let (first, next) = page(&srv, "");
    assert_eq!(first.len(), 500, "the default page");
    assert_eq!(first[..], everything[..500]);
    assert!(
        next.is_some(),
        "the default page of {} has no next",
        everything.len()
    );
    let listed = json(&srv.cli_ok(&["list", "--json"]));
    let mut listed: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect();
    listed.sort_by_key(|s| serial_order(s));
    assert_eq!(listed.len(), everything.len(), "meshca list --json");
    assert_eq!(listed, everything, "meshca list --json");
}

#[test]
fn expired_records_superseded_by_a_newer_one_are_deleted_after_keep_superseded() {
    let tmp = scratch();
    let d = data_dir(&tmp, "keep_superseded = \"1s\"\n", "");
    let mut srv = Server::start(&d, &[]);
    // Three for shop/web, each issued a second after the one before (newer
    // by its validity as well as by its serial), and one for shop/db; all
    // of one second (a TTL the admin may ask for).
    let mut web: Vec<(String, SystemTime)> = Vec::new();
    for _ in 0..3 {
        if let Some((_, not_after)) = web.last() {
            // When the one before was issued, to the second (a TTL of 1 s).
            wait_past(*not_after - Duration::from_secs(1));
        }
        let a = admin_issue(&srv, "shop", "web", r#","ttl":"1s""#);
        web.push((
            a["serial"].as_str().unwrap().to_owned(),
            rfc3339(&a["not_after"]),
        ));
    }
    let db = admin_issue(&srv, "shop", "db", r#","ttl":"1s""#);
    let db_serial = db["serial"].as_str().unwrap().to_owned();
    let latest = web
        .iter()
        .map(|(_, t)| *t)
        .chain([rfc3339(&db["not_after"])])
        .max()
        .unwrap();
    // All expired for longer than keep_superseded (1 s), and far less than
    // keep_expired (7 days); the leader prunes when it starts.
    wait_past(latest + Duration::from_secs(1));
    srv.kill();
    let srv = Server::start(&d, &[]);
    let status = |serial: &str| {
        srv.curl(
            "GET",
            &format!("/v1/certificates/{serial}"),
            None,
            &srv.admin(),
        )
        .0
    };
    eventually(
        "the two superseded records of shop/web to be deleted",
        Duration::from_secs(20),
        || status(&web[0].0) == 404 && status(&web[1].0) == 404,
    );
    assert_eq!(
        status(&web[2].0),
        200,
        "shop/web's newest record, which nothing supersedes, was deleted"
    );
    assert_eq!(status(&db_serial), 200, "shop/db's only record was deleted");
    assert_eq!(serials_of(&srv, "shop/web"), [web[2].0.clone()]);
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let pruned: Vec<Value> = audit
        .lines()
        .map(json)
        .filter(|l| l["action"] == "prune-expired")
        .collect();
    assert!(
        pruned.iter().any(|l| l["outcome"] == "allowed"
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("deleted 2 "))),
        "no prune-expired line of the 2 records deleted: {audit}"
    );
}
