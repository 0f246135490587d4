//! The load generator and target of `bench/proxy.sh`: the same client for
//! every mTLS proxy compared.
//!
//! ```text
//! proxybench target --port P                  # echo; a connection starting with 'S' is a sink
//! proxybench handshakes --addr A --certs D --conns N --seconds S
//! proxybench latency --addr A --certs D --conns N --seconds S [--plain]
//! proxybench throughput --addr A --certs D --bytes B
//! ```
//! Handshakes are full (no session resumption) and each is followed by one
//! echoed byte, so the proxy has verified the client certificate and
//! reached the target. Latency: 64-byte messages echoed over kept-alive
//! connections. Throughput: B bytes one way into the sink, which answers
//! with the count after the half-close.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshca_tls::{CertPaths, CertSet, ServerIdentity, TlsVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn config(certs: &str) -> Arc<ClientConfig> {
    let set =
        CertSet::load(&CertPaths::in_dir(&PathBuf::from(certs))).expect("client certificates");
    let mut c = meshca_tls::client_config(
        &set,
        &ServerIdentity::Dns("localhost".into()),
        TlsVersion::V1_3,
    )
    .expect("client config");
    // Every handshake a full one.
    c.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    Arc::new(c)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(tcp)),
        Some(c) => {
            let name = ServerName::try_from("localhost").expect("name");
            Ok(Box::new(
                tokio_rustls::TlsConnector::from(c.clone())
                    .connect(name, tcp)
                    .await?,
            ))
        }
    }
}

async fn target(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let Ok(n) = s.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            if buf[0] == b'S' {
                let mut total = n as u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(format!("{total}\n").as_bytes()).await;
                return;
            }
            if s.write_all(&buf[..n]).await.is_err() {
                return;
            }
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    if mode == "target" {
        let port: u16 = arg(&args, "--port")
            .and_then(|p| p.parse().ok())
            .expect("--port");
        return target(port).await;
    }
    let addr: SocketAddr = arg(&args, "--addr")
        .and_then(|a| a.parse().ok())
        .expect("--addr");
    let plain = args.iter().any(|a| a == "--plain");
    let tls = (!plain).then(|| config(&arg(&args, "--certs").expect("--certs")));
    let conns: usize = arg(&args, "--conns")
        .and_then(|c| c.parse().ok())
        .unwrap_or(8);
    let seconds: u64 = arg(&args, "--seconds")
        .and_then(|c| c.parse().ok())
        .unwrap_or(10);
    let stop = Arc::new(AtomicBool::new(false));
    match mode.as_str() {
        "handshakes" => {
            let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let (tls, stop, done, failed) =
                    (tls.clone(), stop.clone(), done.clone(), failed.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let ok = async {
                            let mut s = connect(addr, tls.as_ref()).await?;
                            s.write_all(b"h").await?;
                            let mut b = [0u8; 1];
                            s.read_exact(&mut b).await?;
                            Ok::<_, std::io::Error>(())
                        }
                        .await;
                        match ok {
                            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            let n = done.load(Ordering::Relaxed);
            println!(
                "handshakes_per_s {:.0} ok {n} failed {}",
                n as f64 / seconds as f64,
                failed.load(Ordering::Relaxed)
            );
        }
        "latency" => {
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let (tls, stop) = (tls.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut s = connect(addr, tls.as_ref()).await.expect("connect");
                    let msg = [b'x'; 64];
                    let mut back = [0u8; 64];
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        s.write_all(&msg).await.expect("write");
                        s.read_exact(&mut back).await.expect("read");
                        samples.push(t.elapsed().as_micros() as u64);
                    }
                    samples
                }));
            }
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.store(true, Ordering::Relaxed);
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.expect("task"));
            }
            all.sort_unstable();
            println!(
                "requests_per_s {:.0} p50_us {} p99_us {}",
                all.len() as f64 / seconds as f64,
                percentile(&all, 0.5),
                percentile(&all, 0.99)
            );
        }
        "throughput" => {
            let bytes: u64 = arg(&args, "--bytes")
                .and_then(|b| b.parse().ok())
                .unwrap_or(1 << 30);
            let mut s = connect(addr, tls.as_ref()).await.expect("connect");
            let mut chunk = vec![b'd'; 256 * 1024];
            chunk[0] = b'S';
            let t = Instant::now();
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n]).await.expect("write");
                chunk[0] = b'd';
                sent += n as u64;
            }
            s.shutdown().await.expect("half-close");
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.expect("answer");
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(
                answer.trim(),
                bytes.to_string(),
                "the sink must count every byte"
            );
            println!(
                "mib_per_s {:.0} seconds {secs:.2}",
                bytes as f64 / secs / (1024.0 * 1024.0)
            );
        }
        other => panic!("unknown mode {other:?}: target, handshakes, latency or throughput"),
    }
}
