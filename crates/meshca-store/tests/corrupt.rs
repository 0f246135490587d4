//! Records of the embedded store that do not decode (a damaged file, or one
//! written by an incompatible meshca): written here with redb itself into
//! the store's own tables while the store is closed, then read through the
//! store. What the store does: a read of such a record fails with
//! [`StoreError::Corrupt`] naming its key and never decides on it (no
//! token use, no revocation, no status change is written over it); every
//! listing that meets it fails the same way; everything else reads as
//! before; deleting it (a token) is how it is got rid of.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use meshca_pki::Serial;
use meshca_store::*;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use time::OffsetDateTime;

mod fixtures;
use fixtures::hierarchy;

/// The store's tables, as embedded.rs defines them.
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const HIERARCHIES: TableDefinition<&str, &[u8]> = TableDefinition::new("hierarchies");

fn cert(serial: &Serial, name: &str) -> CertificateRecord {
    fixtures::cert(
        serial,
        name,
        OffsetDateTime::now_utc() + Duration::from_secs(3600),
    )
}

fn token(id: &str) -> TokenRecord {
    let now = OffsetDateTime::now_utc();
    TokenRecord {
        id: id.into(),
        secret_sha256: hex::encode([7u8; 32]),
        namespace: "default".into(),
        name: "web".into(),
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
        uses_allowed: 1,
        uses: 0,
    }
}

/// Replaces the value of the record `key` in `table` of the closed store
/// file `path`; the record must be there (a table or key of another name
/// would damage nothing, and the test would pass for nothing).
fn overwrite(path: &Path, table: TableDefinition<&str, &[u8]>, key: &str, value: &[u8]) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(table).unwrap();
        assert!(t.get(key).unwrap().is_some(), "no record {key} to damage");
        t.insert(key, value).unwrap();
    }
    txn.commit().unwrap();
}

/// The key a [`StoreError::Corrupt`] names, or a panic saying what `e` is.
#[track_caller]
fn corrupt_key(e: StoreError) -> String {
    let text = e.to_string();
    match e {
        StoreError::Corrupt { key, .. } => {
            assert!(
                text.contains(&format!("the record {key} in the store does not decode")),
                "{text}"
            );
            key
        }
        other => panic!("expected a record that does not decode, got: {other}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_certificate_record_that_does_not_decode_is_named_and_only_what_reads_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let rt = runtime();
    let (web, db) = (Serial::random().unwrap(), Serial::random().unwrap());
    {
        let store = EmbeddedStore::open(&path).unwrap();
        rt.block_on(async {
            store.insert_certificate(&cert(&web, "web")).await.unwrap();
            store.insert_certificate(&cert(&db, "db")).await.unwrap();
        });
        // Closing the store moves everything into redb.
    }
    // JSON, but not a certificate record.
    overwrite(&path, CERTS, &web.to_hex(), br#"{"serial": 7}"#);

    let store = EmbeddedStore::open(&path).unwrap();
    let now = OffsetDateTime::now_utc();
    rt.block_on(async {
        // The record itself: named, and never decided on.
        let e = store.get_certificate(&web).await.unwrap_err();
        assert_eq!(corrupt_key(e), web.to_hex());
        let e = store
            .revoke_certificate(&web, RevocationReason::KeyCompromise, now)
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), web.to_hex());
        // Its serial stays taken: it is not issued again.
        assert!(store.serial_exists(&web).await.unwrap());
        // Every listing that meets it fails, naming it (the CRL is made
        // from one: a record that cannot be read may be a revocation).
        let e = store
            .list_certificates(&CertFilter::default())
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), web.to_hex());
        let revoked = CertFilter {
            status: Some(CertStatus::Revoked),
            ..CertFilter::default()
        };
        let e = store.list_certificates(&revoked).await.unwrap_err();
        assert_eq!(corrupt_key(e), web.to_hex());
        let of_web = CertFilter {
            namespace: Some("default".into()),
            name: Some("web".into()),
            ..CertFilter::default()
        };
        let e = store.list_certificates(&of_web).await.unwrap_err();
        assert_eq!(corrupt_key(e), web.to_hex());
        // The sweep of expired records stops at it, having deleted nothing.
        let later = now + Duration::from_secs(400 * 86_400);
        let rule = PruneRule {
            expired_before: later,
            superseded_expired_before: later,
        };
        let e = store
            .delete_expired_certificates(&rule, 100)
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), web.to_hex());
        assert_eq!(store.get_certificate(&db).await.unwrap().name, "db");

        // Everything else reads and changes as before.
        let of_db = CertFilter {
            namespace: Some("default".into()),
            name: Some("db".into()),
            ..CertFilter::default()
        };
        let listed = store.list_certificates(&of_db).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].serial, db);
        match store
            .revoke_certificate(&db, RevocationReason::KeyCompromise, now)
            .await
            .unwrap()
        {
            RevokeOutcome::Revoked(r) => assert_eq!(r.status, CertStatus::Revoked),
            other => panic!("{other:?}"),
        }
        let new = Serial::random().unwrap();
        store.insert_certificate(&cert(&new, "new")).await.unwrap();
        assert_eq!(store.get_certificate(&new).await.unwrap().name, "new");
    });
    drop(store);
    // What the store refused to decide on is still what was there.
    let db_file = redb::Database::open(path).unwrap();
    let txn = db_file.begin_read().unwrap();
    let t = txn.open_table(CERTS).unwrap();
    assert_eq!(
        t.get(web.to_hex().as_str()).unwrap().unwrap().value(),
        br#"{"serial": 7}"#
    );
}

#[test]
fn a_token_or_hierarchy_record_that_does_not_decode_is_named_and_buys_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let rt = runtime();
    let secret = [7u8; 32];
    {
        let store = EmbeddedStore::open(&path).unwrap();
        rt.block_on(async {
            store.create_token(&token("aa")).await.unwrap();
            store.create_token(&token("bb")).await.unwrap();
            store.create_hierarchy(&hierarchy("h1")).await.unwrap();
        });
    }
    // Not JSON at all.
    overwrite(&path, TOKENS, "aa", b"\x00\xffnot a record");
    overwrite(&path, HIERARCHIES, "h1", b"{");

    let store = EmbeddedStore::open(&path).unwrap();
    let now = OffsetDateTime::now_utc();
    rt.block_on(async {
        // A use of the damaged token is an error naming it, not a refusal
        // of the token (and not a use), and so is a refund.
        let e = store.consume_token("aa", &secret, now).await.unwrap_err();
        assert_eq!(corrupt_key(e), "aa");
        let e = store.refund_token("aa").await.unwrap_err();
        assert_eq!(corrupt_key(e), "aa");
        let e = store.list_tokens().await.unwrap_err();
        assert_eq!(corrupt_key(e), "aa");
        // The other token is used as before.
        let used = store.consume_token("bb", &secret, now).await.unwrap();
        assert_eq!(used.map(|t| t.uses), Ok(1));
        // Deleting the damaged one is the way out.
        store.delete_token("aa").await.unwrap();
        let ids: Vec<String> = store
            .list_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["bb"]);

        // A damaged hierarchy: named by its id when listed or changed.
        let e = store.list_hierarchies().await.unwrap_err();
        assert_eq!(corrupt_key(e), "h1");
        let e = store
            .set_hierarchy_status("h1", HierarchyStatus::Active, HierarchyStatus::Retiring)
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), "h1");
    });
}
