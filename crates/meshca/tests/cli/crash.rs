//! `kill -9` in the middle of 2,000 concurrent issuances: after restart every
//! certificate whose answer was received is in the store, and the store opens
//! cleanly.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;

use crate::common::*;

#[test]
fn kill_9_loses_no_answered_certificate() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    let mut srv = Server::start(&d, &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let admin = d.join("admin");
    let client = meshca_client::Client::builder(&srv.url())
        .unwrap()
        .trust_pem(&std::fs::read(admin.join("ca.crt")).unwrap())
        .unwrap()
        .identity_pem(
            &std::fs::read(admin.join("tls.crt")).unwrap(),
            &std::fs::read(admin.join("tls.key")).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
    let key = meshca_pki::PrivateKey::generate(meshca_pki::KeyType::EcdsaP256).unwrap();
    let csr = meshca_pki::to_pem("CERTIFICATE REQUEST", &meshca_pki::build_csr(&key).unwrap());
    let answered = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let received: Vec<String> = rt.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for i in 0..2000 {
            let (client, csr, answered, done, gate) = (
                client.clone(),
                csr.clone(),
                answered.clone(),
                done.clone(),
                gate.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire().await.unwrap();
                let body = json!({"name": format!("crash-{i}"), "csr": csr});
                if let Ok(v) = client.post("/v1/sign", &body).await {
                    answered
                        .lock()
                        .unwrap()
                        .push(v["serial"].as_str().unwrap().to_owned());
                }
                done.fetch_add(1, Ordering::Relaxed);
            }));
        }
        // Kill the server once a good part of the work has been answered;
        // a server that stops answering (or refuses everything) fails the
        // test instead of hanging it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let answers = answered.lock().unwrap().len();
            if answers >= 400 {
                break;
            }
            let finished = done.load(Ordering::Relaxed);
            assert!(
                finished < 2000,
                "all 2000 requests finished with only {answers} answered: {}",
                std::fs::read_to_string(&srv.log).unwrap_or_default()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {answers} of 2000 requests answered ({finished} finished) within 120 s: {}",
                std::fs::read_to_string(&srv.log).unwrap_or_default()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        srv.kill(); // SIGKILL: no chance to flush anything
        // Every request ends once the server is gone (refused
        // connections); bounded all the same.
        let killed = tokio::time::Instant::now();
        for t in tasks {
            let ended =
                tokio::time::timeout_at(killed + std::time::Duration::from_secs(60), t).await;
            assert!(
                ended.is_ok(),
                "a request was still pending a minute after the server was killed"
            );
        }
        answered.lock().unwrap().clone()
    });
    assert!(
        received.len() >= 400 && received.len() < 2000,
        "{} answered",
        received.len()
    );
    // The store opens cleanly and holds every answered certificate.
    let listed = ok(&["--dir", d.to_str().unwrap(), "list", "--json"]);
    let stored: HashSet<String> = serde_json::from_str::<Vec<serde_json::Value>>(&listed)
        .unwrap()
        .iter()
        .map(|r| r["serial"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<&String> = received.iter().filter(|s| !stored.contains(*s)).collect();
    assert!(
        lost.is_empty(),
        "{} answered certificates are not in the store, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    // And the server starts again on it.
    let srv = Server::start(&d, &[]);
    assert_eq!(srv.curl("GET", "/readyz", None, &[]).0, 200);
}
