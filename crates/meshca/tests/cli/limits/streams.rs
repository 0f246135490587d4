//! Event streams per certificate, and what the event log keeps per
//! identity: a flood by one evicts none of another's, a resume past a ring
//! is told with `reset`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;
use crate::common::*;
use crate::events::{EventStream, Item, Sse, events_only, rotate, rotate_of};

#[test]
fn open_event_streams_are_limited_per_certificate() {
    let tmp = scratch();
    let d = data_dir(&tmp, "", "event_streams_per_certificate = 2\n");
    let srv = Server::start(&d, &[]);
    let (web, _) = workload(&srv, tmp.path(), "default", "web", "web");
    let (web2, _) = workload(&srv, tmp.path(), "default", "web", "web2");
    let (db, _) = workload(&srv, tmp.path(), "default", "db", "db");
    // Something for each stream to read once it is open: resuming from 0,
    // it gets these from the ring.
    rotate(&srv, "web");
    rotate(&srv, "db");
    let as_web = cert_args(&web);
    let first = EventStream::open(&srv, &as_web, Some(0));
    let second = EventStream::open(&srv, &as_web, Some(0));
    for s in [&first, &second] {
        s.read_until(Duration::from_secs(15), rotate_of("web"));
    }
    healthy(&srv, "with two streams open");

    // A third with the same certificate: refused at once.
    let started = Instant::now();
    let third = call(&srv, "GET", "/v1/events", None, &as_web, 10);
    let took = started.elapsed();
    assert_limited(
        &third,
        "event_streams_per_certificate",
        "a third stream of one certificate",
    );
    let lines = limit_refusals_audited(
        &d,
        "events",
        "workload default/web",
        "event_streams_per_certificate",
    );
    assert_audited_without_flood(&lines, 1, took, "event_streams_per_certificate");
    assert!(limited_total(&srv, "event_streams_per_certificate") >= 1);
    healthy(&srv, "after the refusal");

    // The limit is the certificate's: another certificate of the same
    // identity opens one (the identity's own limit is 64), another
    // identity's certificate does, and the admin does.
    let other_certificate = EventStream::open(&srv, &cert_args(&web2), Some(0));
    other_certificate.read_until(Duration::from_secs(15), rotate_of("web"));
    let other_identity = EventStream::open(&srv, &cert_args(&db), Some(0));
    other_identity.read_until(Duration::from_secs(15), rotate_of("db"));
    let admin = EventStream::open(&srv, &srv.admin(), Some(0));
    admin.read_until(Duration::from_secs(15), rotate_of("web"));
    healthy(&srv, "with five streams open");

    // Once one of the two is closed, the certificate may open another (the
    // probe holds it for two seconds: curl's answer is then the 200 it got).
    drop(first);
    eventually(
        "a new stream of web's certificate once one of its two was closed",
        Duration::from_secs(20),
        || {
            let a = call(&srv, "GET", "/v1/events", None, &as_web, 2);
            match a.code {
                200 => true,
                429 => {
                    assert_limited(&a, "event_streams_per_certificate", "while one closes");
                    false
                }
                other => panic!("a stream of web's certificate: {other} {}", a.body),
            }
        },
    );
    // The refusals closed nothing: the second stream still hears.
    rotate(&srv, "web");
    second.read_until(Duration::from_secs(15), rotate_of("web"));
    healthy(&srv, "at the end");
}

/// The data of a `reset` the stream said, `None` for anything else. A
/// `reset` with an `id:` is an event like the others; one without (a reset
/// need not have an id of its own) is kept by the parser of events.rs as
/// text, `an incomplete event: (None, Some("reset"), Some("<data>"))`.
fn reset_data(item: &Item) -> Option<Value> {
    match item {
        Item::Event(e) if e.kind == "reset" => Some(e.data.clone()),
        Item::Event(_) => None,
        Item::Other(text) => {
            let quoted = text
                .strip_prefix("an incomplete event: (None, Some(\"reset\"), Some(")?
                .strip_suffix("))")?;
            // A Rust debug string of JSON text is a JSON string of it.
            let data: String = serde_json::from_str(quoted).ok()?;
            serde_json::from_str(&data).ok()
        }
    }
}

/// The `issued` event of certificate `serial`.
fn issued_serial(serial: &str) -> impl Fn(&Sse) -> bool + '_ {
    move |e: &Sse| e.kind == "issued" && e.data["serial"] == serial
}

#[test]
fn one_identitys_flood_of_events_evicts_no_other_identitys_and_a_resume_past_its_ring_is_reset() {
    const KEPT: usize = 5;
    const FLOOD: usize = 40;
    let tmp = scratch();
    let d = data_dir(
        &tmp,
        "",
        "events_per_identity = 5\nissuances_per_minute = 1000\n",
    );
    let srv = Server::start(&d, &[]);
    // shop/api: an `issued` and a `rotate`, fewer than its ring keeps.
    let (api, api_serial) = workload(&srv, tmp.path(), "shop", "api", "api");
    let (code, body) = srv.curl("POST", "/v1/identities/shop/api/rotate", None, &srv.admin());
    assert_eq!(code, 200, "{body}");
    // Then shop/web: 40 `issued`, eight times what its ring keeps.
    let (web, first_web) = workload(&srv, tmp.path(), "shop", "web", "web");
    let mut web_serials = vec![first_web];
    for _ in 1..FLOOD {
        let a = admin_issue(&srv, "shop", "web", "");
        web_serials.push(a["serial"].as_str().unwrap().to_owned());
    }
    let last_web = web_serials.last().unwrap().clone();
    // Every event is in the rings once the admin, who sees them all, has
    // read the last one.
    EventStream::open(&srv, &srv.admin(), Some(0))
        .read_until(Duration::from_secs(30), issued_serial(&last_web));

    // shop/api resumes from 0: it missed nothing of its own, so no reset,
    // and it gets its `issued` and its `rotate`, which shop/web's flood did
    // not push out. (With one ring of 5 for everyone, the 40 events of
    // shop/web push both out: shop/api is sent a reset first and never gets
    // its rotate, so this fails, by the rotate not coming.)
    let is_api = |e: &Sse| e.data["namespace"] == "shop" && e.data["name"] == "api";
    let items = EventStream::open(&srv, &cert_args(&api), Some(0))
        .read_until(Duration::from_secs(15), |e| e.kind == "rotate" && is_api(e));
    assert!(
        items.iter().all(|i| reset_data(i).is_none()),
        "shop/api, which missed none of its events, was sent a reset: {items:?}"
    );
    let got = events_only(items);
    let api_events: Vec<(&str, Option<&str>)> = got
        .iter()
        .filter(|&e| is_api(e))
        .map(|e| (e.kind.as_str(), e.data["serial"].as_str()))
        .collect();
    assert_eq!(
        api_events,
        [("issued", Some(api_serial.as_str())), ("rotate", None)],
        "{got:?}"
    );

    // shop/web resumes from 0: its ring dropped 35 of its events, so a
    // reset (reason `ring`) comes first, then the 5 it kept, in order.
    let items = EventStream::open(&srv, &cert_args(&web), Some(0))
        .read_until(Duration::from_secs(15), issued_serial(&last_web));
    let reset = reset_data(&items[0]).unwrap_or_else(|| {
        panic!(
            "shop/web resumed from before what its ring of {KEPT} keeps: the first thing it read is not a reset but {:?}",
            items[0]
        )
    });
    assert_eq!(
        (reset["kind"].as_str(), reset["reason"].as_str()),
        (Some("reset"), Some("ring")),
        "{reset}"
    );
    let after = events_only(items[1..].to_vec());
    assert!(
        after.iter().all(|e| e.kind != "reset"),
        "a second reset: {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1].id > w[0].id),
        "out of order: {after:?}"
    );
    let kept: Vec<&str> = after
        .iter()
        .filter(|e| e.data["namespace"] == "shop" && e.data["name"] == "web")
        .map(|e| e.data["serial"].as_str().unwrap_or_default())
        .collect();
    let newest: Vec<&str> = web_serials[FLOOD - KEPT..]
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(kept, newest, "what shop/web got after the reset");
}

#[test]
fn at_the_identitys_bound_the_oldest_stream_makes_room() {
    let tmp = scratch();
    let d = data_dir(
        &tmp,
        "",
        "event_streams_per_certificate = 1\nevent_streams_per_identity = 2\n",
    );
    let srv = Server::start(&d, &[]);
    let pods: Vec<_> = (0..3)
        .map(|i| workload(&srv, tmp.path(), "default", "web", &format!("pod{i}")).0)
        .collect();
    rotate(&srv, "web");
    let first = EventStream::open(&srv, &cert_args(&pods[0]), Some(0));
    first.read_until(Duration::from_secs(15), rotate_of("web"));
    let second = EventStream::open(&srv, &cert_args(&pods[1]), Some(0));
    second.read_until(Duration::from_secs(15), rotate_of("web"));
    // A third pod of the identity: admitted, and the oldest stream is
    // closed to make room (its client resumes from its last id).
    let third = EventStream::open(&srv, &cert_args(&pods[2]), Some(0));
    third.read_until(Duration::from_secs(15), rotate_of("web"));
    assert!(
        first.ends_within(Duration::from_secs(5)),
        "the identity's oldest stream was not closed"
    );
    // The others stay, and hear what comes next.
    rotate(&srv, "web");
    second.read_until(Duration::from_secs(15), rotate_of("web"));
    third.read_until(Duration::from_secs(15), rotate_of("web"));
}
