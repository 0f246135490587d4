//! The issuance path without HTTP: `Authority::issue` (policy, key or CSR,
//! signature, PEM, the durable record) from 32 concurrent tasks on two
//! worker threads, against a data directory made by `meshca init`. Prints
//! certificates per second and the process's CPU per certificate, the part
//! of `bench/serve.sh`'s figure that is not HTTP, TLS or the load generator.
//!
//! ```text
//! meshca init --dir /tmp/ca && cargo run --release -p meshca-issuer --example issue_loop -- /tmp/ca [issue|sign] [seconds]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshca_issuer::{Authority, BuiltinIssuer, IssueRequest, Policy};
use meshca_pki::{KeyType, PrivateKey, build_csr, parse_csr};

/// The allocator of the `meshca` binary, so that the figures compare.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let from_csr = args.get(2).is_some_and(|a| a == "sign");
    let secs: u64 = args.get(3).map_or(8, |s| s.parse().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store =
            Arc::new(meshca_store::EmbeddedStore::open_existing(&dir.join("store.redb")).unwrap());
        let issuer = Arc::new(
            BuiltinIssuer::open(&dir, store.clone(), None)
                .await
                .unwrap(),
        );
        let authority = Arc::new(Authority::new(issuer, store, Policy::default()));
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let csr_der = build_csr(&key).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (authority, done, stop, csr_der) = (
                authority.clone(),
                done.clone(),
                stop.clone(),
                csr_der.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = IssueRequest::new("default", "web").unwrap();
                    let req = if from_csr {
                        req.csr(parse_csr(&csr_der).unwrap())
                    } else {
                        req.generate_key(KeyType::EcdsaP256)
                    };
                    authority.issue(req).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let (el, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        let n = done.load(Ordering::Relaxed) as f64;
        println!(
            "{} rate {:.0} cpu_us_per_cert {:.1}",
            if from_csr { "sign" } else { "issue" },
            n / el,
            cpu * 1e6 / n
        );
    });
}
