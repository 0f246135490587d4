//! Each mode against curl and openssl.

use std::time::Duration;

use meshca_pki::Profile;
use meshca_tls::{PeerMatcher, TlsConfig, TlsMode, TlsVersion};
use time::OffsetDateTime;

use crate::pki::*;

/// notAfter of the first certificate in a PEM file.
fn not_after(cert: &std::path::Path) -> std::time::SystemTime {
    let der = meshca_pki::parse_certs(&std::fs::read(cert).unwrap()).unwrap();
    meshca_pki::cert_facts(&der[0]).unwrap().not_after.into()
}

fn config(mode: TlsMode, certs: &std::path::Path) -> TlsConfig {
    TlsConfig {
        mode,
        certs: Some(certs.to_owned()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_and_tls_modes() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    let off = start(&TlsConfig::default()).await;
    let (ok, body, _) = curl(&format!("http://{off}/"), &[]).await;
    assert!(ok && body == "anonymous (plaintext)\n", "{body}");

    let tls = start(&config(TlsMode::Tls, &dir.join("server"))).await;
    let url = format!("https://localhost:{}/", tls.port());
    let ca = vec!["--cacert".to_owned(), p(&dir.join("server/ca.crt"))];
    let (ok, body, err) = curl(&url, &ca).await;
    assert!(ok, "{err}");
    assert_eq!(body, "anonymous (tls)\n");
    // Plain HTTP to a TLS port gets nowhere: what it gets back is one TLS
    // alert record, fatal decode_error (the request is no TLS record), then
    // the end of the connection.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(tls).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
            .await
            .expect("the TLS port kept a plain HTTP connection open")
            .unwrap();
        assert_eq!(
            answer,
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32],
            "plain HTTP to a TLS port: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // And the port goes on serving TLS.
    let (ok, body, err) = curl(&url, &ca).await;
    assert!(ok && body == "anonymous (tls)\n", "{body} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_everyone_it_should() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "shop", "web");
    pki.service(&dir.join("allowed"), "shop", "cart");
    pki.service(&dir.join("outsider"), "bank", "teller");
    let now = OffsetDateTime::now_utc();
    pki.write(
        &dir.join("expired"),
        "shop",
        "old",
        Profile::Client,
        now - Duration::from_secs(2 * 86_400),
        Duration::from_secs(3600),
    );
    // Not valid yet: issued an hour from now.
    pki.write(
        &dir.join("future"),
        "shop",
        "early",
        Profile::Client,
        now + Duration::from_secs(3600),
        Duration::from_secs(3600),
    );
    let stranger_pki = Pki::new();
    stranger_pki.service(&dir.join("stranger"), "shop", "cart");
    Pki::labelled("foreign").service(&dir.join("foreign"), "shop", "cart");

    let mut cfg = config(TlsMode::Mtls, &dir.join("server"));
    cfg.allow = vec![PeerMatcher::new("spiffe://cluster.local/ns/shop/*").unwrap()];
    let addr = start(&cfg).await;
    let url = format!("https://localhost:{}/", addr.port());

    let (ok, body, err) = curl(&url, &client_args(&dir.join("allowed"))).await;
    assert!(ok, "allowed client refused: {err}");
    assert_eq!(body, "spiffe://cluster.local/ns/shop/sa/cart (tls)\n");

    // Each refused in the handshake, with the alert that names the reason.
    // (Read by openssl s_client sending nothing: see `Alert` for why curl
    // does not always get to read these alerts.) Each client trusts the
    // server's CA (a stranger's own ca.crt would not trust our server).
    let server_ca = dir.join("server/ca.crt");
    let got = s_client_refusal(addr, &server_ca, None).await;
    assert_refused(&got, CERTIFICATE_REQUIRED, "a client without a certificate");
    for (who, alert) in [
        ("outsider", ACCESS_DENIED),
        ("expired", CERTIFICATE_EXPIRED),
        ("future", CERTIFICATE_EXPIRED),
        // Another PKI made by the same code: the same CA names, another
        // key. Found by name, refused by the signature.
        ("stranger", DECRYPT_ERROR),
        // A CA of other names: unknown.
        ("foreign", UNKNOWN_CA),
    ] {
        let got = s_client_refusal(addr, &server_ca, Some(dir.join(who).as_path())).await;
        assert_refused(&got, alert, who);
    }

    // openssl s_client as an allowed peer: its request is answered (the
    // server saw its identity). (s_client prints "Verify return code: 0":
    // that is its own check of the server.)
    let s_client = |who: &str| {
        let crt = p(&dir.join(who).join("tls.crt"));
        let args: Vec<String> = vec![
            "s_client".into(),
            "-connect".into(),
            addr.to_string(),
            "-servername".into(),
            "web.shop.svc".into(),
            "-verify_return_error".into(),
            "-ign_eof".into(),
            "-CAfile".into(),
            p(&server_ca),
            "-cert".into(),
            crt.clone(),
            "-key".into(),
            p(&dir.join(who).join("tls.key")),
            "-cert_chain".into(),
            crt,
        ];
        run_input(
            "openssl",
            args,
            b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
    };
    let (code, out, err) = s_client("allowed").await;
    assert!(
        code == Some(0)
            && out.contains("Verify return code: 0 (ok)")
            && out.contains("TLSv1.3")
            && out.contains("HTTP/1.1 200")
            && out.contains("spiffe://cluster.local/ns/shop/sa/cart (tls)"),
        "openssl s_client as an allowed peer: {code:?} {out} {err}"
    );
    // After all that, the allowed client is still served.
    let (ok, body, err) = curl(&url, &client_args(&dir.join("allowed"))).await;
    assert!(ok, "allowed client refused after the refusals: {err}");
    assert_eq!(body, "spiffe://cluster.local/ns/shop/sa/cart (tls)\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_when_configured() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    let s_client = |addr: std::net::SocketAddr| {
        vec![
            "s_client".to_owned(),
            "-connect".into(),
            addr.to_string(),
            "-tls1_2".into(),
            "-CAfile".into(),
            p(&dir.join("server/ca.crt")),
        ]
    };
    let strict = start(&config(TlsMode::Tls, &dir.join("server"))).await;
    let (ok, out, err) = run("openssl", s_client(strict)).await;
    assert!(
        !ok && err.contains(PROTOCOL_VERSION.text) && out.contains("Cipher is (NONE)"),
        "TLS 1.2 by default: expected the protocol_version alert: {out} {err}"
    );
    let mut cfg = config(TlsMode::Tls, &dir.join("server"));
    cfg.min_version = TlsVersion::V1_2;
    let lax = start(&cfg).await;
    let (_, out, _) = run("openssl", s_client(lax)).await;
    assert!(
        out.contains("Protocol  : TLSv1.2") && out.contains("Verify return code: 0 (ok)"),
        "{out}"
    );
    // curl agrees.
    let ca = vec![
        "--cacert".to_owned(),
        p(&dir.join("server/ca.crt")),
        "--tls-max".into(),
        "1.2".into(),
    ];
    let got = curl_code(&format!("https://localhost:{}/", strict.port()), &ca).await;
    assert_alert(
        &got,
        PROTOCOL_VERSION,
        "curl with TLS 1.2 at most, by default",
    );
    let (ok, body, err) = curl(&format!("https://localhost:{}/", lax.port()), &ca).await;
    assert!(ok && body == "anonymous (tls)\n", "{body} {err}");
    // The strict server still serves TLS 1.3.
    let (ok, body, err) = curl(
        &format!("https://localhost:{}/", strict.port()),
        &["--cacert".to_owned(), p(&dir.join("server/ca.crt"))],
    )
    .await;
    assert!(ok && body == "anonymous (tls)\n", "{body} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_plaintext_and_tls_on_one_port() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    let addr = start(&config(TlsMode::Permissive, &dir.join("server"))).await;
    let (ok, body, _) = curl(&format!("http://127.0.0.1:{}/", addr.port()), &[]).await;
    assert!(ok && body == "anonymous (plaintext)\n", "{body}");
    let url = format!("https://localhost:{}/", addr.port());
    let (ok, body, err) = curl(&url, &["--cacert".into(), p(&dir.join("server/ca.crt"))]).await;
    assert!(ok && body == "anonymous (tls)\n", "{body} {err}");
    let (ok, body, _) = curl(&url, &client_args(&dir.join("client"))).await;
    assert!(
        ok && body == "spiffe://cluster.local/ns/default/sa/cli (tls)\n",
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_listener_sends_301_to_https() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = plain.local_addr().unwrap().port();
    tokio::spawn(meshca_tls::serve_redirect(plain, 9443));
    let (_, out, _) = run(
        "curl",
        vec![
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code} %{redirect_url}".into(),
            format!("http://localhost:{port}/a/b?c=d"),
        ],
    )
    .await;
    assert_eq!(out, "301 https://localhost:9443/a/b?c=d");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_without_hurting_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    let addr = start(&config(TlsMode::Tls, &dir.join("server"))).await;
    let expected = meshca_tls::ServerIdentity::parse("localhost").unwrap();
    let connector =
        meshca_tls::TlsConnector::new(&dir.join("client"), expected, TlsVersion::V1_3).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut slow = connector.connect(tcp).await.unwrap();
    // Half a request, and then nothing.
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Others are served meanwhile.
    let url = format!("https://localhost:{}/", addr.port());
    let ca = vec!["--cacert".to_owned(), p(&dir.join("server/ca.crt"))];
    for _ in 0..3 {
        assert!(curl(&url, &ca).await.0);
    }
    // Cut off by the server (its header timeout, 10 s): the end of the
    // connection comes before this client's own deadline of 15 s.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut rest))
        .await
        .expect("the slow client was not cut off within 15 s");
    println!("the slow client was cut off after {:?}", started.elapsed());
}

/// One `GET /` over a new TLS connection made with `config`; returns the
/// answer and whether the session was resumed. Reading the answer also
/// takes in whatever session tickets the server sent.
async fn get_with(
    config: &std::sync::Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    name: &str,
) -> Result<(String, bool), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // The request may not get out when the server has refused us already:
    // its alert is read all the same.
    let _ = tls
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tls.read_to_end(&mut buf).await;
    // A server that closes without close_notify still sent the whole answer.
    if buf.is_empty() {
        read.map_err(|e| e.to_string())?;
    }
    Ok((String::from_utf8_lossy(&buf).into_owned(), resumed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_cannot_resume_its_session() {
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    // Valid for 5 seconds.
    pki.write(
        &dir.join("brief"),
        "default",
        "cli",
        Profile::Client,
        OffsetDateTime::now_utc(),
        Duration::from_secs(5),
    );
    let addr = start(&config(TlsMode::Mtls, &dir.join("server"))).await;
    let set =
        meshca_tls::CertSet::load(&meshca_tls::CertPaths::in_dir(&dir.join("brief"))).unwrap();
    let expected = meshca_tls::ServerIdentity::parse("localhost").unwrap();
    let mut client = meshca_tls::client_config(&set, &expected, TlsVersion::V1_3).unwrap();
    // A client that would resume if the server let it (rustls' default).
    client.resumption = rustls::client::Resumption::default();
    let client = std::sync::Arc::new(client);

    let (answer, resumed) = get_with(&client, addr, "localhost").await.unwrap();
    assert!(
        answer.contains("spiffe://cluster.local/ns/default/sa/cli"),
        "{answer}"
    );
    assert!(!resumed);
    // The next connection resumes the session, and is served.
    let (answer, resumed) = get_with(&client, addr, "localhost").await.unwrap();
    assert!(
        resumed,
        "the session was not resumed: this test would prove nothing"
    );
    assert!(answer.contains("sa/cli"), "{answer}");
    // Past the client certificate's notAfter (read from it: one-second
    // precision, inclusive, so a second more).
    let until = not_after(&dir.join("brief/tls.crt")) + Duration::from_millis(1100);
    if let Ok(left) = until.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    // Expired now. Resuming again: the handshake completes (the session is
    // the client's to offer), but the server checks the session's client
    // certificate and closes before answering anything.
    let e = get_with(&client, addr, "localhost").await.unwrap_err();
    // (get_with fails only when nothing at all was answered: the close
    // comes as a reset, or as a close without close_notify.)
    assert!(
        e.contains("reset by peer") || e.contains("close_notify"),
        "a resumed session of an expired certificate: {e}"
    );
    // A full handshake is refused with the alert that says so.
    let mut fresh = meshca_tls::client_config(&set, &expected, TlsVersion::V1_3).unwrap();
    fresh.resumption = rustls::client::Resumption::disabled();
    let e = get_with(&std::sync::Arc::new(fresh), addr, "localhost")
        .await
        .unwrap_err();
    assert!(e.contains("CertificateExpired"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_verifies_every_server_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_t, dir) = tmp();
    let pki = Pki::new();
    pki.service(&dir.join("server"), "default", "web");
    pki.service(&dir.join("client"), "default", "cli");
    // A tls-mode server hands out session tickets.
    let addr = start(&config(TlsMode::Tls, &dir.join("server"))).await;
    let expected = meshca_tls::ServerIdentity::parse("localhost").unwrap();
    let connector =
        meshca_tls::TlsConnector::new(&dir.join("client"), expected, TlsVersion::V1_3).unwrap();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(tcp).await.unwrap();
        assert_ne!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "the connector resumed a session, so it did not verify the server"
        );
        tls.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tls.read_to_end(&mut buf).await;
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    }
}
