//! The load generator of `bench/serve.sh`: the same client against meshca,
//! OpenBao and cfssl. `--connections` keep-alive connections each send one
//! POST after another for `--seconds`; prints the rate of 2xx answers and
//! latency percentiles.
//!
//! `loadgen --url https://localhost:9443/v1/sign --body FILE [--header 'K: V']...
//!  [--ca F --cert F --key F] --connections 32 --seconds 20`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

struct Args {
    url: String,
    body: Bytes,
    headers: Vec<(String, String)>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    connections: usize,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args {
        url: String::new(),
        body: Bytes::new(),
        headers: vec![],
        ca: None,
        cert: None,
        key: None,
        connections: 32,
        seconds: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().expect("flag value");
        match flag.as_str() {
            "--url" => a.url = v,
            "--body" => a.body = std::fs::read(&v).expect("body file").into(),
            "--header" => {
                let (k, val) = v.split_once(':').expect("K: V");
                a.headers.push((k.trim().to_owned(), val.trim().to_owned()));
            }
            "--ca" => a.ca = Some(v),
            "--cert" => a.cert = Some(v),
            "--key" => a.key = Some(v),
            "--connections" => a.connections = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

enum Conn {
    Plain(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
}

async fn connect(
    a: &Args,
    tls: &Option<tokio_rustls::TlsConnector>,
    addr: &str,
    host: &str,
) -> Option<Conn> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let _ = a;
    let sender = match tls {
        Some(c) => {
            let name = ServerName::try_from(host.to_owned()).ok()?;
            let s = c.connect(name, tcp).await.ok()?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .ok()?;
            tokio::spawn(conn);
            sender
        }
        None => {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .ok()?;
            tokio::spawn(conn);
            sender
        }
    };
    Some(Conn::Plain(sender))
}

#[tokio::main]
async fn main() {
    let a = Arc::new(args());
    let (scheme, rest) = a.url.split_once("://").expect("URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    };
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .to_owned();
    let tls = (scheme == "https").then(|| {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(a.ca.as_ref().expect("--ca")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let cfg = match (&a.cert, &a.key) {
            (Some(c), Some(k)) => b
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(c)
                        .unwrap()
                        .map(|c| c.unwrap())
                        .collect(),
                    PrivateKeyDer::from_pem_file(k).unwrap(),
                )
                .unwrap(),
            _ => b.with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    });
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let (a, tls, ok, bad, stop, lat) = (
            a.clone(),
            tls.clone(),
            ok.clone(),
            bad.clone(),
            stop.clone(),
            latencies.clone(),
        );
        let (authority, host, path) = (authority.to_owned(), host.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Vec::new();
            let mut conn: Option<Conn> = None;
            while !stop.load(Ordering::Relaxed) {
                if conn.is_none() {
                    conn = connect(&a, &tls, &authority, &host).await;
                    if conn.is_none() {
                        bad.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                let Some(Conn::Plain(sender)) = conn.as_mut() else {
                    continue;
                };
                let mut req = http::Request::post(path.as_str())
                    .header("host", authority.as_str())
                    .header("content-type", "application/json");
                for (k, v) in &a.headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                let req = req.body(Full::new(a.body.clone())).unwrap();
                let t0 = Instant::now();
                let result = async {
                    sender.ready().await.ok()?;
                    let resp = sender.send_request(req).await.ok()?;
                    let status = resp.status();
                    resp.into_body().collect().await.ok()?;
                    Some(status)
                }
                .await;
                match result {
                    Some(s) if s.is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        local.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Some(_) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
            lat.lock().unwrap().extend(local);
        }));
    }
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "rate {:.0} p50_ms {:.2} p99_ms {:.2} ok {} errors {}",
        n as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        n,
        bad.load(Ordering::Relaxed)
    );
}
