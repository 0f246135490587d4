//! The plain API: `TlsAcceptor::accept` on a raw TCP listener, and
//! `TlsConnector` checking the server's DNS name or SPIFFE ID.

use std::sync::Arc;

use meshca_tls::{ServerIdentity, TlsAcceptor, TlsConfig, TlsConnector, TlsMode, TlsVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pki::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_server_and_client_identity_checks() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "shop", "cart");
    let cfg = TlsConfig {
        mode: TlsMode::Mtls,
        certs: Some(dir.join("server")),
        ..Default::default()
    };
    let acceptor = Arc::new(TlsAcceptor::new(&cfg).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An echo-the-identity server on raw streams.
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok((mut conn, peer)) = acceptor.accept(tcp).await {
                    let _ = conn.write_all(peer.describe().as_bytes()).await;
                    let _ = conn.shutdown().await;
                }
            });
        }
    });

    let talk = |expected: &str| {
        let expected = ServerIdentity::parse(expected).unwrap();
        let client = dir.join("client");
        async move {
            let connector = TlsConnector::new(&client, expected, TlsVersion::V1_3).unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = connector.connect(tcp).await.map_err(|e| e.to_string())?;
            let mut out = String::new();
            let _ = tls.read_to_string(&mut out).await;
            Ok::<_, String>(out)
        }
    };
    for good in [
        "web.default.svc",
        "web.default.svc.cluster.local",
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://cluster.local/ns/default/*",
    ] {
        assert_eq!(
            talk(good).await.unwrap(),
            "spiffe://cluster.local/ns/shop/sa/cart",
            "{good}"
        );
    }
    for bad in [
        "db.default.svc",
        "spiffe://cluster.local/ns/default/sa/db",
        "spiffe://other.td/ns/default/sa/web",
    ] {
        let e = talk(bad).await.unwrap_err();
        assert!(e.contains("NotValidForName"), "{bad}: {e}");
    }
}
