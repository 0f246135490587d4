//! The embedded store's journal as a crash or a damaged disk could leave it:
//! opening a store whose journal holds any bytes never panics. Either the
//! store refuses to open, naming the journal, or it opens, every record it
//! holds is readable by serial and equal to its listing, and opening it
//! again gives the same records (replay is done once, and is idempotent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_store::{CertFilter, EmbeddedStore, Store};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("store.redb");
    std::fs::write(dir.path().join("store.redb.journal-0"), data).expect("the journal is written");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let store = match EmbeddedStore::open(&path) {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("journal"),
                    "the refusal does not name the journal: {msg}"
                );
                return;
            }
        };
        let listed = store
            .list_certificates(&CertFilter::default())
            .await
            .expect("a store that opened lists its records");
        for r in &listed {
            assert_eq!(
                &store
                    .get_certificate(&r.serial)
                    .await
                    .expect("listed, so found"),
                r
            );
        }
        drop(store);
        assert!(
            !dir.path().join("store.redb.journal-0").exists(),
            "a clean close removes the journal"
        );
        let again = EmbeddedStore::open(&path).expect("the store opens again");
        let relisted = again
            .list_certificates(&CertFilter::default())
            .await
            .expect("and lists");
        assert_eq!(relisted, listed);
    });
});
