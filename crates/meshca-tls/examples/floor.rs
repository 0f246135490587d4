//! The floor of `bench/serve.sh`: what a CA service on this stack could do
//! at best. It serves the same HTTPS + client certificate as `meshca serve`
//! (through [`meshca_tls::serve`]) and does only the public-key work of an
//! issuance per request, nothing else: `POST /v1/issue` generates a P-256
//! key and makes one P-256 signature; `POST /v1/sign` verifies one P-256
//! signature (a CSR's) and makes one. No JSON, no certificate, no store, no
//! audit; the answer is a fixed 2,600-byte body (the size of meshca's).
//!
//! ```text
//! cargo run --release -p meshca-tls --example floor -- --certs DIR --listen 127.0.0.1:9443
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use axum::body::Bytes;
use axum::{Router, routing::post};
use clap::Parser;
use meshca_tls::{TlsAcceptor, TlsConfig, TlsMode, TlsVersion};

#[derive(Parser)]
struct Args {
    #[arg(long, help = "directory with tls.crt, tls.key and ca.crt")]
    certs: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
}

struct Work {
    ca: EcdsaKeyPair,
    csr_key: Vec<u8>,
    csr_sig: Vec<u8>,
    tbs: Vec<u8>,
    answer: Bytes,
    rng: SystemRandom,
}

fn work() -> Work {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ca = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let csr = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    // A CSR's signed part and a leaf's TBS are a few hundred bytes.
    let tbs = vec![0x5a; 450];
    let csr_sig = csr.sign(&rng, &tbs[..250]).unwrap().as_ref().to_vec();
    Work {
        ca,
        csr_key: csr.public_key().as_ref().to_vec(),
        csr_sig,
        tbs,
        answer: vec![b'x'; 2600].into(),
        rng,
    }
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let config = TlsConfig {
        mode: TlsMode::Mtls,
        certs: Some(a.certs),
        min_version: TlsVersion::V1_3,
        redirect: None,
        allow: vec![],
        alpn: None,
        revocation: Default::default(),
    };
    let w = Arc::new(work());
    let (wi, ws) = (w.clone(), w.clone());
    let app = Router::new()
        .route(
            "/v1/issue",
            post(move |_body: Bytes| async move {
                let pkcs8 =
                    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &wi.rng).unwrap();
                std::hint::black_box(pkcs8);
                std::hint::black_box(wi.ca.sign(&wi.rng, &wi.tbs).unwrap());
                wi.answer.clone()
            }),
        )
        .route(
            "/v1/sign",
            post(move |_body: Bytes| async move {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &ws.csr_key)
                    .verify(&ws.tbs[..250], &ws.csr_sig)
                    .unwrap();
                std::hint::black_box(ws.ca.sign(&ws.rng, &ws.tbs).unwrap());
                ws.answer.clone()
            }),
        );
    let acceptor = Arc::new(TlsAcceptor::new(&config).unwrap());
    let listener = tokio::net::TcpListener::bind(a.listen).await.unwrap();
    meshca_tls::serve(listener, acceptor, app).await.unwrap();
}
