//! Signing throughput of meshca-pki on one thread, for `bench/pki.sh`.
//!
//! Measures, per key type (P-256 leaves under a P-256 CA, Ed25519 leaves
//! under an Ed25519 CA):
//! - `csr`: parse a CSR, verify its signature, build the SANs, draw a serial
//!   and sign the leaf (one verify + one sign of real crypto);
//! - `gen`: generate the leaf key, build the SANs, draw a serial, sign the
//!   leaf, and encode the key as PEM (one keygen + one sign).
//!
//! Prints `name rate` lines (certificates per second, the median of the
//! rounds) for the script to compare with `openssl speed`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use meshca_pki::*;
use time::OffsetDateTime;

fn ca(kt: KeyType, now: OffsetDateTime) -> SigningCa {
    let td = TrustDomain::default();
    let key = PrivateKey::generate(kt).unwrap();
    let der = generate_root(&key, &td, "bench", DEFAULT_ROOT_TTL, now).unwrap();
    SigningCa::new(der, key, "bench CA", now).unwrap()
}

fn spec(td: &TrustDomain, id: &Identity) -> LeafSpec {
    LeafSpec {
        sans: SanSet::build(id, td, &[], &[]).unwrap(),
        identity: id.clone(),
        trust_domain: td.clone(),
        profile: Profile::Service,
        ttl: Duration::from_secs(86_400),
        serial: Serial::random().unwrap(),
    }
}

/// Runs `f` repeatedly for about `secs`, returns operations per second.
fn rate(secs: f64, mut f: impl FnMut(usize)) -> f64 {
    // Warm up.
    for i in 0..50 {
        f(i);
    }
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            f(n);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let secs: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let now = OffsetDateTime::now_utc();
    let td = TrustDomain::default();
    let id = Identity::new("default", "web").unwrap();
    for (label, kt) in [("p256", KeyType::EcdsaP256), ("ed25519", KeyType::Ed25519)] {
        let ca = ca(kt, now);
        // Distinct CSRs, each from its own key.
        let csrs: Vec<Vec<u8>> = (0..512)
            .map(|_| build_csr(&PrivateKey::generate(kt).unwrap()).unwrap())
            .collect();
        let csr_rates: Vec<f64> = (0..rounds)
            .map(|_| {
                rate(secs, |i| {
                    let csr = parse_csr(&csrs[i % csrs.len()]).unwrap();
                    let s = spec(&td, &id);
                    let leaf = ca.sign_leaf(csr.public_key(), &s, now).unwrap();
                    std::hint::black_box(leaf);
                })
            })
            .collect();
        println!("csr_{label} {:.0}", median(csr_rates));
        let gen_rates: Vec<f64> = (0..rounds)
            .map(|_| {
                rate(secs, |_| {
                    let key = PrivateKey::generate(kt).unwrap();
                    let s = spec(&td, &id);
                    let leaf = ca
                        .sign_leaf(&LeafPublicKey::of(&key).unwrap(), &s, now)
                        .unwrap();
                    std::hint::black_box((leaf, key.to_pem()));
                })
            })
            .collect();
        println!("gen_{label} {:.0}", median(gen_rates));
    }
}
