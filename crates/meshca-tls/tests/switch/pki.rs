//! A test PKI made with meshca-pki, and a server started in-process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router, routing::get};
use meshca_pki::*;
use meshca_tls::{Peer, TlsAcceptor, TlsConfig};
use time::OffsetDateTime;

pub struct Pki {
    pub root_der: Vec<u8>,
    pub int: SigningCa,
    pub td: TrustDomain,
}

impl Pki {
    /// A root and an intermediate, valid from three days ago.
    pub fn new() -> Pki {
        let now = OffsetDateTime::now_utc() - Duration::from_secs(3 * 86_400);
        let td = TrustDomain::default();
        let rk = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let root_der = generate_root(&rk, &td, "test", DEFAULT_ROOT_TTL, now).unwrap();
        let root = SigningCa::new(root_der.clone(), rk, "root", now).unwrap();
        let ik = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let int_der =
            generate_intermediate(&ik, &root, &td, "test", DEFAULT_ROOT_TTL, now).unwrap();
        let int = SigningCa::new(int_der, ik, "int", now).unwrap();
        Pki { root_der, int, td }
    }

    /// Writes `tls.crt` (leaf + intermediate), `tls.key`, `ca.crt` into `dir`
    /// for `ns/name`, issued at `issued` with lifetime `ttl`. Returns the serial.
    pub fn write(
        &self,
        dir: &Path,
        ns: &str,
        name: &str,
        profile: Profile,
        issued: OffsetDateTime,
        ttl: Duration,
    ) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let (crt, key, serial) = self.leaf(ns, name, profile, issued, ttl);
        std::fs::write(dir.join("tls.crt"), crt).unwrap();
        write_key(&dir.join("tls.key"), key.as_bytes());
        std::fs::write(dir.join("ca.crt"), self.bundle()).unwrap();
        serial
    }

    /// A valid `service` certificate for `ns/name` in `dir`.
    pub fn service(&self, dir: &Path, ns: &str, name: &str) -> String {
        self.write(
            dir,
            ns,
            name,
            Profile::Service,
            OffsetDateTime::now_utc(),
            Duration::from_secs(3600),
        )
    }

    pub fn leaf(
        &self,
        ns: &str,
        name: &str,
        profile: Profile,
        issued: OffsetDateTime,
        ttl: Duration,
    ) -> (String, String, String) {
        let id = Identity::new(ns, name).unwrap();
        let spec = LeafSpec {
            sans: SanSet::build(&id, &self.td, &["localhost".into()], &["127.0.0.1".into()])
                .unwrap(),
            identity: id,
            trust_domain: self.td.clone(),
            profile,
            ttl,
            serial: Serial::random().unwrap(),
        };
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let leaf = self
            .int
            .sign_leaf(&LeafPublicKey::of(&key).unwrap(), &spec, issued)
            .unwrap();
        let crt = to_pem("CERTIFICATE", &leaf.der) + &to_pem("CERTIFICATE", self.int.cert_der());
        (crt, key.to_pem(), leaf.serial.to_hex())
    }

    pub fn bundle(&self) -> String {
        to_pem("CERTIFICATE", &self.root_der)
    }
}

/// Writes a private key as meshca-tls requires it: readable by its owner
/// only (0600, set exactly whatever the umask or an older file's mode).
pub fn write_key(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    chmod(path, 0o600);
}

/// Writes one file of a credential set, `name` telling which: `tls.key`
/// gets 0600.
pub fn write_named(path: &Path, name: &str, bytes: &[u8]) {
    if name == "tls.key" {
        write_key(path, bytes);
    } else {
        std::fs::write(path, bytes).unwrap();
    }
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts `hello`'s router with `config` on 127.0.0.1; returns its address.
pub async fn start(config: &TlsConfig) -> SocketAddr {
    start_with_poll(config, meshca_tls::DEFAULT_POLL).await
}

pub async fn start_with_poll(config: &TlsConfig, poll: Duration) -> SocketAddr {
    let acceptor = Arc::new(TlsAcceptor::with_poll(config, poll).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/",
        get(|Extension(peer): Extension<Peer>| async move {
            format!(
                "{} ({})\n",
                peer.describe(),
                if peer.tls { "tls" } else { "plaintext" }
            )
        }),
    );
    tokio::spawn(meshca_tls::serve(listener, acceptor, app));
    addr
}

/// Runs a command off the async workers; returns (success, stdout, stderr).
pub async fn run(program: &str, args: Vec<String>) -> (bool, String, String) {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// curl with the given extra arguments against `url`.
pub async fn curl(url: &str, extra: &[String]) -> (bool, String, String) {
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--fail".into(),
        "--max-time".into(),
        "10".into(),
    ];
    args.extend_from_slice(extra);
    args.push(url.to_owned());
    run("curl", args).await
}

/// curl arguments presenting the credentials in `dir` and trusting its ca.crt.
pub fn client_args(dir: &Path) -> Vec<String> {
    vec![
        "--cacert".into(),
        p(&dir.join("ca.crt")),
        "--cert".into(),
        p(&dir.join("tls.crt")),
        "--key".into(),
        p(&dir.join("tls.key")),
    ]
}

pub fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

pub fn tmp() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().to_owned();
    (t, p)
}
