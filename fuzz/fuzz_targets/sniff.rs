//! Permissive mode's protocol sniffing, over a real loopback connection: a
//! client's first bytes decide TLS or plaintext. Never a panic or a hang;
//! a first byte of 0x16 (a TLS handshake record) is never served as
//! plaintext, anything else is served as plaintext byte for byte (the peek
//! consumes nothing), and nothing that is not a real handshake gets TLS.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshca_pki::*;
use meshca_tls::{Conn, TlsAcceptor, TlsConfig, TlsMode};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Env {
    rt: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    _dir: tempfile::TempDir,
}

/// A server certificate made by meshca-pki, and a permissive acceptor.
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let now = OffsetDateTime::now_utc() - Duration::from_secs(60);
        let td = TrustDomain::default();
        let rk = PrivateKey::generate(KeyType::EcdsaP256).expect("root key");
        let root_der = generate_root(&rk, &td, "fuzz", DEFAULT_ROOT_TTL, now).expect("root");
        let root = SigningCa::new(root_der.clone(), rk, "root", now).expect("root ca");
        let id = Identity::new("default", "fuzz").expect("identity");
        let spec = LeafSpec {
            sans: SanSet::build(&id, &td, &["localhost".into()], &[]).expect("sans"),
            identity: id,
            trust_domain: td,
            profile: Profile::Service,
            ttl: Duration::from_secs(86_400),
            serial: Serial::random().expect("serial"),
        };
        let key = PrivateKey::generate(KeyType::EcdsaP256).expect("leaf key");
        let leaf = root
            .sign_leaf(&LeafPublicKey::of(&key).expect("public key"), &spec, now)
            .expect("leaf");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tls.crt"), to_pem("CERTIFICATE", &leaf.der))
            .expect("write");
        std::fs::write(dir.path().join("tls.key"), key.to_pem()).expect("write");
        std::fs::write(dir.path().join("ca.crt"), to_pem("CERTIFICATE", &root_der)).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.path().join("tls.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("chmod");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (listener, acceptor) = rt.block_on(async {
            let config = TlsConfig {
                mode: TlsMode::Permissive,
                certs: Some(dir.path().to_owned()),
                ..Default::default()
            };
            let acceptor = TlsAcceptor::new(&config).expect("acceptor");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            (listener, acceptor)
        });
        Env {
            rt,
            listener,
            acceptor,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let addr = env.listener.local_addr().expect("address");
    env.rt.block_on(async {
        let client = async {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(data).await.expect("write");
            c.shutdown().await.expect("shutdown");
            // Keep reading until the server is done with us.
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink).await;
        };
        let server = async {
            let (tcp, _) = env.listener.accept().await.expect("accept");
            match env.acceptor.accept(tcp).await {
                Ok((Conn::Plain(mut tcp), peer)) => {
                    assert!(!peer.tls);
                    assert!(
                        data.first() != Some(&0x16),
                        "a TLS record served as plaintext"
                    );
                    let mut got = Vec::new();
                    tcp.read_to_end(&mut got).await.expect("read");
                    assert_eq!(got, data, "the plaintext stream lost or changed bytes");
                }
                Ok((Conn::Tls(_), _)) => panic!("TLS established from a one-sided byte stream"),
                Err(_) => assert_eq!(data.first(), Some(&0x16), "plaintext refused"),
            }
        };
        tokio::time::timeout(Duration::from_secs(15), async {
            tokio::join!(client, server)
        })
        .await
        .expect("the sniff hung");
    });
});
