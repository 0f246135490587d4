//! The behaviour every `Store` backend must have. Each backend gets the same
//! checks through `check_all`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshca_pki::Serial;
use meshca_store::*;
use time::OffsetDateTime;

mod fixtures;
use fixtures::{cert, hierarchy};

/// The seal key the etcd stores of these tests authenticate their records with.
fn seal() -> meshca_pki::SealKey {
    meshca_pki::SealKey::from_file_content("42".repeat(32).as_bytes()).unwrap()
}

async fn check_all(store: Arc<dyn Store>) {
    let now = OffsetDateTime::now_utc();
    // Certificates: insert is insert-if-absent.
    let s1 = Serial::random().unwrap();
    let s2 = Serial::random().unwrap();
    store
        .insert_certificate(&cert(&s1, "web", now + Duration::from_secs(3600)))
        .await
        .unwrap();
    store
        .insert_certificate(&cert(&s2, "db", now + Duration::from_secs(60)))
        .await
        .unwrap();
    let dup = store
        .insert_certificate(&cert(&s1, "other", now))
        .await
        .unwrap_err();
    assert!(dup.is_conflict(), "{dup}");
    assert_eq!(store.get_certificate(&s1).await.unwrap().name, "web");
    assert!(store.serial_exists(&s1).await.unwrap());
    let unknown = Serial::random().unwrap();
    assert!(!store.serial_exists(&unknown).await.unwrap());
    assert!(
        store
            .get_certificate(&unknown)
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Listing: soonest expiry first, filters combine.
    let all = store
        .list_certificates(&CertFilter::default())
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["db", "web"]
    );
    let soon = CertFilter {
        not_after_before: Some(now + Duration::from_secs(600)),
        ..Default::default()
    };
    assert_eq!(store.list_certificates(&soon).await.unwrap().len(), 1);
    let by_name = CertFilter {
        name: Some("web".into()),
        ..Default::default()
    };
    assert_eq!(
        store.list_certificates(&by_name).await.unwrap()[0].serial,
        s1
    );
    // One identity (namespace and name) is read through the index: the
    // same answer, other filters still applied.
    let s3 = Serial::random().unwrap();
    store
        .insert_certificate(&cert(&s3, "web", now + Duration::from_secs(7200)))
        .await
        .unwrap();
    let web = |status| CertFilter {
        namespace: Some("default".into()),
        name: Some("web".into()),
        status,
        ..Default::default()
    };
    let listed = store.list_certificates(&web(None)).await.unwrap();
    assert_eq!(
        listed.iter().map(|c| &c.serial).collect::<Vec<_>>(),
        [&s1, &s3]
    );
    let other_ns = CertFilter {
        namespace: Some("shop".into()),
        ..web(None)
    };
    assert!(store.list_certificates(&other_ns).await.unwrap().is_empty());
    let we = CertFilter {
        name: Some("we".into()),
        ..web(None)
    };
    assert!(store.list_certificates(&we).await.unwrap().is_empty());

    // Revocation happens once.
    match store
        .revoke_certificate(&s1, RevocationReason::KeyCompromise, now)
        .await
        .unwrap()
    {
        RevokeOutcome::Revoked(r) => assert_eq!(r.status, CertStatus::Revoked),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.revoke_certificate(&s1, RevocationReason::Superseded, now).await.unwrap(),
        RevokeOutcome::AlreadyRevoked(r) if r.revocation_reason == Some(RevocationReason::KeyCompromise)
    ));
    assert!(
        store
            .revoke_certificate(&unknown, RevocationReason::Unspecified, now)
            .await
            .unwrap_err()
            .is_not_found()
    );
    let revoked = CertFilter {
        status: Some(CertStatus::Revoked),
        ..Default::default()
    };
    assert_eq!(store.list_certificates(&revoked).await.unwrap().len(), 1);

    // Hierarchies: create once, status changes are compare-and-swap.
    store.create_hierarchy(&hierarchy("h1")).await.unwrap();
    assert!(
        store
            .create_hierarchy(&hierarchy("h1"))
            .await
            .unwrap_err()
            .is_conflict()
    );
    store
        .set_hierarchy_status("h1", HierarchyStatus::Active, HierarchyStatus::Retiring)
        .await
        .unwrap();
    assert!(
        store
            .set_hierarchy_status("h1", HierarchyStatus::Active, HierarchyStatus::Retired)
            .await
            .unwrap_err()
            .is_conflict()
    );
    assert!(
        store
            .set_hierarchy_status("nope", HierarchyStatus::Active, HierarchyStatus::Retired)
            .await
            .unwrap_err()
            .is_not_found()
    );
    let hs = store.list_hierarchies().await.unwrap();
    assert_eq!(hs.len(), 1);
    assert_eq!(hs[0].status, HierarchyStatus::Retiring);

    // A renewed intermediate replaces the one the caller saw, once.
    let seen = hs[0].intermediate_pem.clone();
    let update = meshca_store::IntermediateUpdate {
        intermediate_pem: "renewed".into(),
        intermediate_not_after: hs[0].intermediate_not_after + time::Duration::days(1),
        sealed_intermediate: None,
    };
    let renewed = store
        .replace_intermediate("h1", &seen, update.clone())
        .await
        .unwrap();
    assert_eq!(renewed.intermediate_pem, "renewed");
    assert!(
        store
            .replace_intermediate("h1", &seen, update)
            .await
            .unwrap_err()
            .is_conflict(),
        "a second renewal from the same view must lose"
    );
    assert_eq!(
        store.list_hierarchies().await.unwrap()[0].intermediate_pem,
        "renewed"
    );

    // Concurrent inserts of one serial: exactly one wins, each of the others
    // is told the serial is taken (a conflict, nothing changed), and the
    // record kept is the winner's.
    let s3 = Serial::random().unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        let rec = cert(&s3, &format!("racer{i}"), now);
        tasks.push(tokio::spawn(
            async move { store.insert_certificate(&rec).await },
        ));
    }
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(()) => winners.push(format!("racer{i}")),
            Err(e) => assert!(
                e.is_conflict()
                    && e.to_string()
                        == format!(
                            "conflict: serial {s3} is already recorded; nothing was changed"
                        ),
                "racer{i} lost with {e:?}"
            ),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(store.get_certificate(&s3).await.unwrap().name, winners[0]);
    let by_serial = store
        .list_certificates(&CertFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.serial == s3)
        .count();
    assert_eq!(by_serial, 1);
    // Nothing of a loser was kept: its identity lists no certificate.
    for i in 0..8 {
        let name = format!("racer{i}");
        let filter = CertFilter {
            namespace: Some("default".into()),
            name: Some(name.clone()),
            ..Default::default()
        };
        let listed = store.list_certificates(&filter).await.unwrap().len();
        assert_eq!(listed, usize::from(name == winners[0]), "{name}");
    }

    check_tokens(store.clone()).await;
    check_events(store.clone()).await;
    check_blobs_and_leadership(store.clone()).await;
    check_expired_sweep(store.clone()).await;
    check_paging(store.clone()).await;
    check_prune_rule(store.clone()).await;
    check_group_commit(store).await;
}

/// Events: ids grow; a subscriber from an id gets what came after it, then
/// new ones as they are appended.
async fn next(feed: &mut EventFeed) -> StoredEvent {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("an event within 10 s")
        .expect("the feed goes on")
}

async fn check_events(store: Arc<dyn Store>) {
    let a = store.append_event(b"{\"n\":1}").await.unwrap();
    let b = store.append_event(b"{\"n\":2}").await.unwrap();
    assert!(b > a, "event ids grow: {a} then {b}");
    let mut feed = store.watch_events(a).await.unwrap();
    let e = next(&mut feed).await;
    assert_eq!((e.id, e.body.as_slice()), (b, &b"{\"n\":2}"[..]));
    let c = store.append_event(b"{\"n\":3}").await.unwrap();
    let e = next(&mut feed).await;
    assert_eq!((e.id, e.body.as_slice()), (c, &b"{\"n\":3}"[..]));
    // From the start: everything retained, in order.
    let mut all = store.watch_events(0).await.unwrap();
    let first = next(&mut all).await;
    assert!(first.id <= a);
}

async fn check_blobs_and_leadership(store: Arc<dyn Store>) {
    assert_eq!(store.get_blob("missing").await.unwrap(), None);
    store.put_blob("config", b"one").await.unwrap();
    store.put_blob("config", b"two").await.unwrap();
    assert_eq!(
        store.get_blob("config").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    store.check().await.unwrap();
    store.put_blob("agents/r1", b"x").await.unwrap();
    store.put_blob("agents/r2/9", b"y").await.unwrap();
    store
        .put_blob("agentsz", b"not under agents/")
        .await
        .unwrap();
    let mut listed = store.list_blobs("agents/").await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("agents/r1".to_owned(), b"x".to_vec()),
            ("agents/r2/9".to_owned(), b"y".to_vec())
        ]
    );
    let mut leading = store.campaign("replica-a").await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), leading.wait_for(|l| *l))
        .await
        .expect("a lone candidate leads within 15 s")
        .unwrap();
    assert!(!store.location().is_empty());
}

fn token(id: &str, secret: &[u8], uses: u32, ttl: Duration) -> TokenRecord {
    let now = OffsetDateTime::now_utc();
    TokenRecord {
        id: id.into(),
        secret_sha256: meshca_pki::fingerprint(secret),
        namespace: "default".into(),
        name: "web".into(),
        created_at: now,
        expires_at: now + ttl,
        uses_allowed: uses,
        uses: 0,
    }
}

async fn check_tokens(store: Arc<dyn Store>) {
    let now = OffsetDateTime::now_utc();
    let hour = Duration::from_secs(3600);
    store
        .create_token(&token("t1", b"s1", 1, hour))
        .await
        .unwrap();
    assert!(
        store
            .create_token(&token("t1", b"x", 1, hour))
            .await
            .unwrap_err()
            .is_conflict()
    );
    let h = |s: &[u8]| meshca_pki::sha256(s);
    assert_eq!(
        store
            .consume_token("t1", &h(b"wrong"), now)
            .await
            .unwrap()
            .unwrap_err(),
        TokenRefusal::WrongSecret
    );
    assert_eq!(
        store
            .consume_token("nope", &h(b"s1"), now)
            .await
            .unwrap()
            .unwrap_err(),
        TokenRefusal::Unknown
    );
    let used = store
        .consume_token("t1", &h(b"s1"), now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((used.uses, used.name.as_str()), (1, "web"));
    assert_eq!(
        store
            .consume_token("t1", &h(b"s1"), now)
            .await
            .unwrap()
            .unwrap_err(),
        TokenRefusal::UsedUp
    );
    store.refund_token("t1").await.unwrap();
    assert!(
        store
            .consume_token("t1", &h(b"s1"), now)
            .await
            .unwrap()
            .is_ok()
    );
    assert_eq!(
        store
            .consume_token("t1", &h(b"s1"), now)
            .await
            .unwrap()
            .unwrap_err(),
        TokenRefusal::UsedUp
    );
    store
        .create_token(&token("t2", b"s2", 5, hour))
        .await
        .unwrap();
    assert_eq!(
        store
            .consume_token("t2", &h(b"s2"), now + hour * 2)
            .await
            .unwrap()
            .unwrap_err(),
        TokenRefusal::Expired
    );
    // Two (or eight) concurrent uses of a one-use token: exactly one passes.
    store
        .create_token(&token("once", b"s", 1, hour))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .consume_token("once", &meshca_pki::sha256(b"s"), now)
                    .await
            })
        })
        .collect();
    // The others are each refused as used up (not as unknown, a wrong
    // secret or a store error), and the token shows its one use.
    let mut passed = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Ok(rec) => {
                passed += 1;
                assert_eq!(rec.uses, 1);
            }
            Err(why) => assert_eq!(why, TokenRefusal::UsedUp),
        }
    }
    assert_eq!(passed, 1);
    let tokens = store.list_tokens().await.unwrap();
    assert_eq!(tokens.len(), 3);
    let once = tokens.iter().find(|t| t.id == "once").unwrap();
    assert_eq!((once.uses, once.uses_allowed), (1, 1));
    store.delete_token("t2").await.unwrap();
    assert!(store.delete_token("t2").await.unwrap_err().is_not_found());
    assert!(
        !format!("{:?}", token("t", b"secret", 1, hour))
            .contains(&meshca_pki::fingerprint(b"secret"))
    );
}

/// Records expired before the cut-off go, in batches of at most the limit,
/// revoked or not; later ones stay.
async fn check_expired_sweep(store: Arc<dyn Store>) {
    let now = OffsetDateTime::now_utc();
    let day = Duration::from_secs(86_400);
    let old: Vec<Serial> = (0..5).map(|_| Serial::random().unwrap()).collect();
    for (i, serial) in old.iter().enumerate() {
        store
            .insert_certificate(&cert(serial, &format!("old{i}"), now - 10 * day))
            .await
            .unwrap();
    }
    store
        .revoke_certificate(&old[0], RevocationReason::Superseded, now)
        .await
        .unwrap();
    let recent = Serial::random().unwrap();
    store
        .insert_certificate(&cert(&recent, "recent", now - day))
        .await
        .unwrap();
    let cutoff = now - 5 * day;
    // One cut-off for all: superseded or not, a record expired before it goes.
    let rule = PruneRule {
        expired_before: cutoff,
        superseded_expired_before: cutoff,
    };
    assert_eq!(
        store.delete_expired_certificates(&rule, 2).await.unwrap(),
        2
    );
    assert_eq!(
        store.delete_expired_certificates(&rule, 100).await.unwrap(),
        3
    );
    assert_eq!(
        store.delete_expired_certificates(&rule, 100).await.unwrap(),
        0
    );
    for serial in &old {
        let gone = store.get_certificate(serial).await.unwrap_err();
        assert!(gone.is_not_found(), "{gone}");
    }
    assert_eq!(store.get_certificate(&recent).await.unwrap().name, "recent");
    // Their index keys went with them.
    for i in 0..5 {
        let one = CertFilter {
            namespace: Some("default".into()),
            name: Some(format!("old{i}")),
            ..Default::default()
        };
        assert!(store.list_certificates(&one).await.unwrap().is_empty());
    }
    let everything = store
        .list_certificates(&CertFilter::default())
        .await
        .unwrap();
    assert!(everything.iter().all(|r| r.not_after >= cutoff));
    assert!(everything.iter().any(|r| r.serial == recent));
}

/// Every page of the listing of `filter`, `limit` records at a time, from
/// the start: the size of each page and the serials in the order returned.
/// Each page holds only matching records; a page with a `next` is full and
/// its `next` is its last serial.
async fn walk(store: &dyn Store, filter: &CertFilter, limit: usize) -> (Vec<usize>, Vec<Serial>) {
    let mut sizes = Vec::new();
    let mut serials: Vec<Serial> = Vec::new();
    let mut after: Option<Serial> = None;
    for _ in 0..10_000 {
        let page = store
            .list_certificates_page(filter, after.as_ref(), limit)
            .await
            .unwrap();
        assert!(
            page.records.len() <= limit.max(1),
            "{} records in a page of {limit}",
            page.records.len()
        );
        assert!(page.records.iter().all(|r| filter.matches(r)), "{filter:?}");
        sizes.push(page.records.len());
        serials.extend(page.records.iter().map(|r| r.serial.clone()));
        match page.next {
            Some(next) => {
                assert_eq!(
                    page.records.len(),
                    limit.max(1),
                    "a page with a next is full"
                );
                assert_eq!(
                    Some(&next),
                    page.records.last().map(|r| &r.serial),
                    "next is the page's last serial"
                );
                after = Some(next);
            }
            None => return (sizes, serials),
        }
    }
    panic!("the listing of {filter:?} did not end");
}

/// The keys (serial hex) of `serials`, as given.
fn hexes<'a>(serials: impl IntoIterator<Item = &'a Serial>) -> Vec<String> {
    serials.into_iter().map(Serial::to_hex).collect()
}

/// Paged listing: key (serial) order, each record once, a cursor that is
/// any serial (in the store or not), filters applied before the limit.
async fn check_paging(store: Arc<dyn Store>) {
    let now = OffsetDateTime::now_utc();
    let later = now + Duration::from_secs(3600);
    // Seven records in a namespace of their own: four of paging/a, three
    // of paging/b; one of each revoked.
    let mut inserted: Vec<(Serial, &str)> = Vec::new();
    for i in 0..7 {
        let name = if i < 4 { "a" } else { "b" };
        let serial = Serial::random().unwrap();
        let mut rec = cert(&serial, name, later);
        rec.namespace = "paging".into();
        store.insert_certificate(&rec).await.unwrap();
        inserted.push((serial, name));
    }
    for i in [1, 5] {
        store
            .revoke_certificate(&inserted[i].0, RevocationReason::KeyCompromise, now)
            .await
            .unwrap();
    }
    let sorted = |mut keys: Vec<String>| {
        keys.sort();
        keys
    };
    let all_seven = sorted(inserted.iter().map(|(s, _)| s.to_hex()).collect());
    let a_four = sorted(
        inserted
            .iter()
            .filter(|(_, name)| *name == "a")
            .map(|(s, _)| s.to_hex())
            .collect(),
    );
    let revoked_two = sorted([1, 5].iter().map(|i| inserted[*i].0.to_hex()).collect());

    // One namespace, three at a time: pages of 3, 3 and 1, each record
    // once, in key order, the last page without a next.
    let paging = CertFilter {
        namespace: Some("paging".into()),
        ..Default::default()
    };
    let (sizes, serials) = walk(&*store, &paging, 3).await;
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(hexes(&serials), all_seven);

    // Revoked ones of the namespace only, one at a time.
    let revoked = CertFilter {
        status: Some(CertStatus::Revoked),
        ..paging.clone()
    };
    let (sizes, serials) = walk(&*store, &revoked, 1).await;
    assert_eq!(hexes(&serials), revoked_two);
    assert!(
        sizes.iter().take(2).all(|n| *n == 1) && sizes.iter().skip(2).all(|n| *n == 0),
        "{sizes:?}"
    );

    // One identity (through the identity index): its four, 3 then 1.
    let of_a = CertFilter {
        namespace: Some("paging".into()),
        name: Some("a".into()),
        ..Default::default()
    };
    let (sizes, serials) = walk(&*store, &of_a, 3).await;
    assert_eq!(sizes, [3, 1]);
    assert_eq!(hexes(&serials), a_four);

    // The whole store: what a full listing holds, each record once, in
    // key order.
    let mut everything = hexes(
        &store
            .list_certificates(&CertFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.serial)
            .collect::<Vec<_>>(),
    );
    everything.sort();
    let (_, serials) = walk(&*store, &CertFilter::default(), 3).await;
    assert_eq!(hexes(&serials), everything);

    // A serial that is not in the store is a position all the same.
    let probe = Serial::random().unwrap();
    assert!(!store.serial_exists(&probe).await.unwrap());
    let after_probe = |keys: &[String]| -> Vec<String> {
        keys.iter()
            .filter(|k| k.as_str() > probe.to_hex().as_str())
            .cloned()
            .collect()
    };
    for (filter, keys) in [(&paging, &all_seven), (&of_a, &a_four)] {
        let page = store
            .list_certificates_page(filter, Some(&probe), 100)
            .await
            .unwrap();
        assert_eq!(
            hexes(page.records.iter().map(|r| &r.serial)),
            after_probe(keys.as_slice()),
            "{filter:?}"
        );
        assert!(page.next.is_none(), "{filter:?}");
    }
    // Before every key, after every key.
    let first: Serial = "00".parse().unwrap();
    let page = store
        .list_certificates_page(&paging, Some(&first), 100)
        .await
        .unwrap();
    assert_eq!(hexes(page.records.iter().map(|r| &r.serial)), all_seven);
    assert!(page.next.is_none());
    let last: Serial = "ff".repeat(16).parse().unwrap();
    for filter in [&paging, &of_a, &CertFilter::default()] {
        let page = store
            .list_certificates_page(filter, Some(&last), 3)
            .await
            .unwrap();
        assert!(page.records.is_empty() && page.next.is_none(), "{filter:?}");
    }
    // A limit of 0 counts as 1.
    let page = store
        .list_certificates_page(&paging, None, 0)
        .await
        .unwrap();
    assert_eq!(
        hexes(page.records.iter().map(|r| &r.serial)),
        all_seven[..1].to_vec()
    );
    assert_eq!(
        page.next.as_ref().map(Serial::to_hex),
        Some(all_seven[0].clone())
    );
}

/// A record superseded by a newer one of its identity goes once it expired
/// before the (later) superseded cut-off; the newest record of an identity
/// stays until the expiry cut-off. One per call with a limit of 1.
async fn check_prune_rule(store: Arc<dyn Store>) {
    let now = OffsetDateTime::now_utc();
    let hour = Duration::from_secs(3600);
    let week = Duration::from_secs(7 * 86_400);
    let expired = now - 2 * hour;
    // Three records of prune-a (the last in key order is its newest), one
    // of prune-b, all expired two hours ago.
    let mut a: Vec<Serial> = (0..3).map(|_| Serial::random().unwrap()).collect();
    a.sort_by_key(Serial::to_hex);
    for serial in &a {
        store
            .insert_certificate(&cert(serial, "prune-a", expired))
            .await
            .unwrap();
    }
    let b = Serial::random().unwrap();
    store
        .insert_certificate(&cert(&b, "prune-b", expired))
        .await
        .unwrap();
    // Superseded records kept three hours: none of these goes yet.
    let early = PruneRule {
        expired_before: now - week,
        superseded_expired_before: now - 3 * hour,
    };
    assert_eq!(
        store
            .delete_expired_certificates(&early, 100)
            .await
            .unwrap(),
        0
    );
    // Kept one hour: prune-a's two older records go, one per call.
    let rule = PruneRule {
        expired_before: now - week,
        superseded_expired_before: now - hour,
    };
    for expected in [1, 1, 0] {
        assert_eq!(
            store.delete_expired_certificates(&rule, 1).await.unwrap(),
            expected
        );
    }
    assert_eq!(
        store.delete_expired_certificates(&rule, 100).await.unwrap(),
        0
    );
    for serial in &a[..2] {
        let gone = store.get_certificate(serial).await.unwrap_err();
        assert!(gone.is_not_found(), "{gone}");
    }
    assert_eq!(store.get_certificate(&a[2]).await.unwrap().name, "prune-a");
    assert_eq!(store.get_certificate(&b).await.unwrap().name, "prune-b");
    // Their index keys went with them.
    let of_a = CertFilter {
        namespace: Some("default".into()),
        name: Some("prune-a".into()),
        ..Default::default()
    };
    let left: Vec<Serial> = store
        .list_certificates(&of_a)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(left, [a[2].clone()]);
}

/// Many concurrent inserts (committed in groups) are all durable and all distinct.
async fn check_group_commit(store: Arc<dyn Store>) {
    let before = store
        .list_certificates(&CertFilter::default())
        .await
        .unwrap()
        .len();
    let now = OffsetDateTime::now_utc();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let rec = cert(&Serial::random().unwrap(), &format!("bulk{i}"), now);
                store.insert_certificate(&rec).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let after = store
        .list_certificates(&CertFilter::default())
        .await
        .unwrap()
        .len();
    assert_eq!(after, before + 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_behaves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    check_all(Arc::new(EmbeddedStore::open(&path).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let serial = Serial::random().unwrap();
    {
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .insert_certificate(&cert(&serial, "web", OffsetDateTime::now_utc()))
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open_existing(&path).unwrap();
    assert_eq!(store.get_certificate(&serial).await.unwrap().name, "web");
    let missing = EmbeddedStore::open_existing(&dir.path().join("nope.redb")).unwrap_err();
    assert!(missing.is_unavailable() && missing.to_string().contains("nope.redb"));
}

async fn count(store: &dyn Store, filter: &CertFilter) -> usize {
    store.list_certificates(filter).await.unwrap().len()
}

/// What a crash leaves: the files as they are while the store runs, with
/// answered inserts in the journal and not yet in redb. Opening them again
/// puts every answered record back (with its index key), once; a clean
/// close leaves the records in redb and no journal behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_replays_its_journal_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let crashed = tempfile::tempdir().unwrap();
    let copy = crashed.path().join("store.redb");
    let later = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let store = Arc::new(EmbeddedStore::open(&path).unwrap());
    let first = Serial::random().unwrap();
    store
        .insert_certificate(&cert(&first, "web", later))
        .await
        .unwrap();
    // One scan makes the first record checkpointed; the next 300 are
    // answered and (checkpoints wait for 2,048 records or 200 ms) in the
    // journal only when the files are copied.
    assert_eq!(count(&*store, &web_of("default")).await, 1);
    let mut tasks = Vec::new();
    for i in 0..300 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let serial = Serial::random().unwrap();
            let name = if i % 2 == 0 { "web" } else { "api" };
            store
                .insert_certificate(&cert(&serial, name, later))
                .await
                .unwrap();
            serial
        }));
    }
    let mut serials = vec![first];
    for t in tasks {
        serials.push(t.await.unwrap());
    }
    for name in ["store.redb", "store.redb.journal-0", "store.redb.journal-1"] {
        std::fs::copy(dir.path().join(name), crashed.path().join(name)).unwrap();
    }
    assert!(
        std::fs::metadata(dir.path().join("store.redb.journal-0"))
            .unwrap()
            .len()
            > 300 * 200,
        "the records are in the journal"
    );
    // Read while still in memory: by serial and by scan.
    assert_eq!(
        store.get_certificate(&serials[7]).await.unwrap().serial,
        serials[7]
    );
    assert!(store.serial_exists(&serials[8]).await.unwrap());
    drop(store);
    assert!(
        !dir.path().join("store.redb.journal-0").exists(),
        "a clean close leaves no journal"
    );
    let closed = EmbeddedStore::open_existing(&path).unwrap();
    assert_eq!(
        closed
            .list_certificates(&CertFilter::default())
            .await
            .unwrap()
            .len(),
        301
    );
    drop(closed);

    // Twice: the second opening finds what the first one checkpointed.
    for round in 0..2 {
        let store = EmbeddedStore::open_existing(&copy).unwrap();
        for s in &serials {
            assert_eq!(
                &store.get_certificate(s).await.unwrap().serial,
                s,
                "round {round}"
            );
        }
        let all = store
            .list_certificates(&CertFilter::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 301, "round {round}: each record once");
        assert_eq!(count(&store, &web_of("default")).await, 151);
        // A serial answered before the crash is still taken.
        assert!(
            store
                .insert_certificate(&cert(&serials[3], "web", later))
                .await
                .unwrap_err()
                .is_conflict()
        );
    }
}

fn web_of(namespace: &str) -> CertFilter {
    CertFilter {
        namespace: Some(namespace.into()),
        name: Some("web".into()),
        ..Default::default()
    }
}

/// A store written before the identity index existed: its records are
/// found by identity after it is opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_indexes_old_records_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let serial = Serial::random().unwrap();
    let later = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    {
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .insert_certificate(&cert(&serial, "web", later))
            .await
            .unwrap();
    }
    // What an older meshca left: no index table, no marker.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(redb::TableDefinition::<&str, &[u8]>::new("identities"))
            .unwrap();
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("blobs"))
            .unwrap()
            .remove("index/identity-v1")
            .unwrap();
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open_existing(&path).unwrap();
    let found = store.list_certificates(&web_of("default")).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].serial, serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_indexes_old_records_when_opened() {
    let etcd = meshca_testkit::EtcdCluster::start(1);
    let url = etcd.store_url("/old/");
    let serial = Serial::random().unwrap();
    let later = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    {
        let store = EtcdStore::open(EtcdStoreConfig::from_url(&url).unwrap(), &seal())
            .await
            .unwrap();
        store
            .insert_certificate(&cert(&serial, "web", later))
            .await
            .unwrap();
    }
    // What an older meshca left: no index keys, no marker.
    let config = EtcdStoreConfig::from_url(&url).unwrap();
    let client = meshca_etcd::Client::new(config.etcd.clone()).unwrap();
    let mut old: Vec<Vec<u8>> = client
        .get_prefix(b"/old/ids/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(old.len(), 1, "the insert wrote its index key");
    old.push(b"/old/blobs/index/identity-v1".to_vec());
    for key in old {
        assert_eq!(client.delete(&key).await.unwrap(), 1);
    }
    let store = EtcdStore::open(config, &seal()).await.unwrap();
    let found = store.list_certificates(&web_of("default")).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].serial, serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_behaves() {
    let etcd = meshca_testkit::EtcdCluster::start(1);
    let config = EtcdStoreConfig::from_url(&etcd.store_url("/behaviour/")).unwrap();
    let store = EtcdStore::open(config, &seal()).await.unwrap();
    check_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_urls_are_checked() {
    for bad in [
        "http://x:1",
        "etcd://",
        "etcd://host",
        "etcd://host:notaport/x",
        "etcd://a:1,/p",
    ] {
        let e = EtcdStoreConfig::from_url(bad).unwrap_err();
        assert!(e.to_string().contains("expected etcd://"), "{bad}: {e}");
    }
    let c = EtcdStoreConfig::from_url("etcd://a:1,b:2").unwrap();
    assert_eq!((c.etcd.endpoints.len(), c.prefix.as_str()), (2, "/meshca/"));
    assert_eq!(
        EtcdStoreConfig::from_url("etcd://a:1/x").unwrap().prefix,
        "/x/"
    );
    // Nothing listens there: a clear error naming the place, quickly
    // (within 10 s, or the open is abandoned and the test fails).
    let port = meshca_testkit::free_port();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        EtcdStore::open(
            EtcdStoreConfig::from_url(&format!("etcd://127.0.0.1:{port}")).unwrap(),
            &seal(),
        ),
    )
    .await
    .expect("opening a store where nothing listens did not fail within 10 s")
    .unwrap_err();
    assert!(
        e.is_unavailable() && e.to_string().contains(&port.to_string()),
        "{e}"
    );
}

/// Two replicas race for leadership: exactly one leads; when it stops, the
/// other takes over within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leadership_moves_when_the_leader_goes() {
    let etcd = meshca_testkit::EtcdCluster::start(1);
    let mut config = EtcdStoreConfig::from_url(&etcd.store_url("/election/")).unwrap();
    config.lease_ttl = Duration::from_secs(2);
    let lease = config.lease_ttl;
    let a = EtcdStore::open(config.clone(), &seal()).await.unwrap();
    let b = EtcdStore::open(config, &seal()).await.unwrap();
    let mut la = a.campaign("a").await.unwrap();
    let mut lb = b.campaign("b").await.unwrap();
    // One of them is elected...
    tokio::time::timeout(Duration::from_secs(15), async {
        tokio::select! {
            r = la.wait_for(|l| *l) => r.map(|_| ()),
            r = lb.wait_for(|l| *l) => r.map(|_| ()),
        }
    })
    .await
    .expect("neither candidate leads within 15 s")
    .unwrap();
    assert!(*la.borrow() ^ *lb.borrow(), "exactly one leads");
    let (leader, mut follower) = if *la.borrow() { (la, lb) } else { (lb, la) };
    // ...and the other does not take over while it is there: watched for a
    // whole lease (an absence: as long as a lease the leader failed to keep
    // alive would take to run out).
    assert!(
        tokio::time::timeout(lease, follower.wait_for(|l| *l))
            .await
            .is_err(),
        "both lead"
    );
    assert!(*leader.borrow(), "the leader stopped leading by itself");
    // The leader's process goes away (its campaign ends, its lease is revoked).
    drop(leader);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), follower.wait_for(|l| *l))
        .await
        .expect("the other replica leads within the lease")
        .unwrap();
    println!(
        "the other replica leads {:?} after the leader went",
        started.elapsed()
    );
}

/// A member that dies is skipped at once: requests go to the others
/// without waiting for a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_skips_a_dead_member() {
    let etcd = meshca_testkit::EtcdCluster::start(3);
    let store = EtcdStore::open(
        EtcdStoreConfig::from_url(&etcd.store_url("/skip/")).unwrap(),
        &seal(),
    )
    .await
    .unwrap();
    let now = OffsetDateTime::now_utc();
    store
        .insert_certificate(&cert(&Serial::random().unwrap(), "before", now))
        .await
        .unwrap();
    for member in [0, 1] {
        etcd.stop_member(member);
        let started = std::time::Instant::now();
        // Without waiting for a timeout on the dead member: 20 inserts
        // within 5 s, or they are abandoned and the test fails.
        tokio::time::timeout(Duration::from_secs(5), async {
            for i in 0..20 {
                store
                    .insert_certificate(&cert(
                        &Serial::random().unwrap(),
                        &format!("after{i}"),
                        now,
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("with member {member} down: {e}"));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("with member {member} down, 20 inserts took over 5 s"));
        println!(
            "member {member} down: 20 inserts in {:?}",
            started.elapsed()
        );
        etcd.restart_member(member);
        etcd.wait_healthy(Duration::from_secs(20));
    }
}
