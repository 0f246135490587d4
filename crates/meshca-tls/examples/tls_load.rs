//! The load client of `bench/tls.sh`: the same client for meshca and for
//! nginx. Each request is a new TCP connection and a full TLS 1.3 handshake
//! with a client certificate (no resumption), `GET /`, read the answer, close.
//! Offers X25519 only, so both servers do the same key exchange (nginx's
//! OpenSSL 3.0 has no post-quantum hybrid).
//!
//! `tls_load --addr 127.0.0.1:8443 --certs DIR --name localhost --seconds 5 --concurrency 16`
//! prints `handshakes_per_sec N`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::client::Resumption;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    certs: PathBuf,
    #[arg(long, default_value = "localhost")]
    name: String,
    #[arg(long, default_value = "5")]
    seconds: u64,
    #[arg(long, default_value = "16")]
    concurrency: usize,
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(a.certs.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(a.certs.join("tls.crt"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    // Read as meshca-tls reads it: refused when group or others can read it.
    let key_pem = meshca_files::read_secret(&a.certs.join("tls.key"), 1 << 20)
        .unwrap_or_else(|e| panic!("{e}"));
    let key = PrivateKeyDer::from_pem_slice(&key_pem).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.resumption = Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(a.name.clone()).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|_| {
            let (connector, name, done, failed, stop) = (
                connector.clone(),
                name.clone(),
                done.clone(),
                failed.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let ok = async {
                        let tcp = tokio::net::TcpStream::connect(a.addr).await.ok()?;
                        tcp.set_nodelay(true).ok()?;
                        let mut tls = connector.connect(name.clone(), tcp).await.ok()?;
                        tls.write_all(
                            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                        )
                        .await
                        .ok()?;
                        let mut buf = Vec::with_capacity(512);
                        let _ = tls.read_to_end(&mut buf).await;
                        buf.starts_with(b"HTTP/1.1 200").then_some(())
                    }
                    .await;
                    match ok {
                        Some(()) => done.fetch_add(1, Ordering::Relaxed),
                        None => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    println!("handshakes_per_sec {:.0}", n as f64 / elapsed);
    println!("failed {}", failed.load(Ordering::Relaxed));
}
