//! Certificates swapped under a running server with requests in flight:
//! no request fails, and new handshakes show the new certificate within 2 s.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshca_tls::{PeerIdentity, ServerIdentity, TlsConfig, TlsConnector, TlsMode, TlsVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::pki::*;

/// One request on a new connection (so a new handshake); returns the
/// serial of the server certificate it saw.
async fn request(connector: &TlsConnector, addr: SocketAddr) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| PeerIdentity::from_der(c))
        .map(|id| id.serial)
        .ok_or("no server certificate")?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    // A server that closes without close_notify still sent the whole answer.
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200")
        || !text.contains("spiffe://cluster.local/ns/default/sa/cli")
    {
        return Err(format!("bad answer: {text}"));
    }
    Ok(serial)
}

struct Load {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
    seen: Mutex<Vec<(Instant, String)>>,
    stop: AtomicBool,
}

async fn run_load(connector: Arc<TlsConnector>, addr: SocketAddr, load: Arc<Load>) {
    while !load.stop.load(Ordering::Relaxed) {
        match request(&connector, addr).await {
            Ok(serial) => {
                load.ok.fetch_add(1, Ordering::Relaxed);
                load.seen.lock().await.push((Instant::now(), serial));
            }
            Err(e) => load.failed.lock().await.push(e),
        }
    }
}

/// Starts an mTLS server on `server_dir` and 4 clients; calls `swap` once
/// 300 requests have passed; requires zero failures over at least 1,000
/// requests, and that the served serial becomes `expect_after(...)` within 2 s.
async fn swap_under_load(
    server_dir: &Path,
    client_dir: &Path,
    swap: impl AsyncFnOnce() -> Option<String>,
) {
    let cfg = TlsConfig {
        mode: TlsMode::Mtls,
        certs: Some(server_dir.to_owned()),
        ..Default::default()
    };
    let addr = start(&cfg).await;
    let expected = ServerIdentity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let connector = Arc::new(TlsConnector::new(client_dir, expected, TlsVersion::V1_3).unwrap());
    let load = Arc::new(Load {
        ok: AtomicUsize::new(0),
        failed: Mutex::new(Vec::new()),
        seen: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let workers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(run_load(connector.clone(), addr, load.clone())))
        .collect();
    while load.ok.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let swapped_at = Instant::now();
    let new_serial = swap().await;
    // Keep going until 1,000 requests and 2.5 s after the swap.
    while load.ok.load(Ordering::Relaxed) < 1000
        || swapped_at.elapsed() < Duration::from_millis(2500)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failed = load.failed.lock().await;
    assert!(
        failed.is_empty(),
        "{} failed requests, first: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(load.ok.load(Ordering::Relaxed) >= 1000);
    let seen = load.seen.lock().await;
    match new_serial {
        Some(serial) => {
            let first_new = seen
                .iter()
                .find(|(_, s)| *s == serial)
                .map(|(t, _)| t.duration_since(swapped_at))
                .expect("the new certificate was never served");
            assert!(
                first_new <= Duration::from_secs(2),
                "picked up after {first_new:?}"
            );
            assert_eq!(seen.last().map(|(_, s)| s.clone()), Some(serial));
        }
        None => {
            let serials: std::collections::HashSet<_> =
                seen.iter().map(|(_, s)| s.clone()).collect();
            assert_eq!(serials.len(), 1, "a broken set was served");
        }
    }
}

fn files(dir: &Path) -> [(String, Vec<u8>); 3] {
    ["tls.crt", "tls.key", "ca.crt"].map(|f| (f.to_owned(), std::fs::read(dir.join(f)).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_in_place() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    let next = pki.service(&dir.join("next"), "default", "web");
    let server = dir.join("server");
    let new = files(&dir.join("next"));
    swap_under_load(&server, &dir.join("client"), async || {
        // Truncate and rewrite each file: a reader can see them half done.
        for (name, bytes) in &new {
            write_named(&server.join(name), name, bytes);
        }
        Some(next)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_by_rename() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    let next = pki.service(&dir.join("next"), "default", "web");
    let server = dir.join("server");
    let new = files(&dir.join("next"));
    swap_under_load(&server, &dir.join("client"), async || {
        for (name, bytes) in &new {
            let tmp = server.join(format!(".{name}.new"));
            write_named(&tmp, name, bytes);
            std::fs::rename(&tmp, server.join(name)).unwrap();
        }
        Some(next)
    })
    .await;
}

/// The layout kubelet gives a mounted secret: the files are symlinks through
/// `..data`, itself a symlink to a timestamped directory flipped atomically.
fn kube_layout(dir: &Path, version: &str, source: &Path) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&versioned).unwrap();
    for (name, bytes) in files(source) {
        write_named(&versioned.join(&name), &name, &bytes);
    }
    let tmp_link = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp_link).unwrap();
    std::fs::rename(&tmp_link, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_kubernetes_secret_symlinks() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("first"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    let next = pki.service(&dir.join("next"), "default", "web");
    let server = dir.join("server");
    kube_layout(&server, "2026_11_23_10_00_00.1", &dir.join("first"));
    let source = dir.join("next");
    swap_under_load(&server, &dir.join("client"), async || {
        kube_layout(&server, "2026_11_23_10_05_00.2", &source);
        std::fs::remove_dir_all(server.join("..2026_11_23_10_00_00.1")).unwrap();
        Some(next)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_set_is_ignored_then_a_good_one_is_taken() {
    keep_reload_logs();
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    pki.service(&dir.join("other"), "default", "web");
    let server = dir.join("server");
    let wrong_key = std::fs::read(dir.join("other/tls.key")).unwrap();
    // A key that does not match: ignored, the old certificate stays.
    swap_under_load(&server, &dir.join("client"), async || {
        std::fs::write(server.join("tls.key"), &wrong_key).unwrap();
        None
    })
    .await;
    // Then the matching certificate arrives: taken.
    let other_crt = std::fs::read(dir.join("other/tls.crt")).unwrap();
    let serial = PeerIdentity::from_der(&meshca_pki::parse_certs(&other_crt).unwrap()[0])
        .unwrap()
        .serial;
    let cfg = TlsConfig {
        mode: TlsMode::Mtls,
        certs: Some(server.clone()),
        ..Default::default()
    };
    // (A fresh server would refuse the broken set; the running one above kept
    // serving. Check the repair on a server started before the breakage.)
    let pki2_dir = dir.join("server2");
    pki.service(&pki2_dir, "default", "web");
    let addr = start(&TlsConfig {
        certs: Some(pki2_dir.clone()),
        ..cfg
    })
    .await;
    std::fs::write(pki2_dir.join("tls.key"), &wrong_key).unwrap();
    // The reload that read it has called it broken (and serves on with the
    // set it had) before the repair arrives.
    let key = pki2_dir.join("tls.key").display().to_string();
    reload_logged(
        &["ignoring new TLS credentials", &key],
        Duration::from_secs(20),
    )
    .await;
    std::fs::write(pki2_dir.join("tls.crt"), &other_crt).unwrap();
    let expected = ServerIdentity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let connector = TlsConnector::new(&dir.join("client"), expected, TlsVersion::V1_3).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = request(&connector, addr).await.unwrap();
        if got == serial {
            break;
        }
        assert!(Instant::now() < deadline, "the repaired set was not taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_others_can_read_is_not_served_until_it_is_private() {
    keep_reload_logs();
    let (_t, dir) = tmp();
    let pki = Pki::new();
    let first = pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    let next = pki.service(&dir.join("next"), "default", "web");
    let server = dir.join("server");
    let addr = start(&TlsConfig {
        mode: TlsMode::Mtls,
        certs: Some(server.clone()),
        ..Default::default()
    })
    .await;
    let expected = ServerIdentity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let connector = TlsConnector::new(&dir.join("client"), expected, TlsVersion::V1_3).unwrap();
    assert_eq!(request(&connector, addr).await.unwrap(), first);
    // The new set arrives by rename, its key readable by everyone (as `cp`
    // under umask 022 leaves it).
    for (name, bytes) in files(&dir.join("next")) {
        let tmp = server.join(format!(".{name}.new"));
        std::fs::write(&tmp, bytes).unwrap();
        chmod(&tmp, 0o644);
        std::fs::rename(&tmp, server.join(name)).unwrap();
    }
    // The reload that read the new set has refused it (it says so, naming
    // the key)...
    let key = server.join("tls.key").display().to_string();
    reload_logged(
        &["refusing the TLS credentials on disk", &key, "(mode 0644)"],
        Duration::from_secs(20),
    )
    .await;
    // ...and serves on with the old set.
    for _ in 0..3 {
        assert_eq!(request(&connector, addr).await.unwrap(), first);
    }
    // Made private: taken within the usual second or two.
    chmod(&server.join("tls.key"), 0o600);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if request(&connector, addr).await.unwrap() == next {
            break;
        }
        assert!(Instant::now() < deadline, "the private key was not taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
