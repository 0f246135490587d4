//! A test PKI made with meshca-pki, and a server started in-process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
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
        Pki::labelled("test")
    }

    /// The same, with `label` in the CA names (another label: a CA no
    /// verifier can mistake for this one by name).
    pub fn labelled(label: &str) -> Pki {
        let now = OffsetDateTime::now_utc() - Duration::from_secs(3 * 86_400);
        let td = TrustDomain::default();
        let rk = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let root_der = generate_root(&rk, &td, label, DEFAULT_ROOT_TTL, now).unwrap();
        let root = SigningCa::new(root_der.clone(), rk, "root", now).unwrap();
        let ik = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let int_der = generate_intermediate(&ik, &root, &td, label, DEFAULT_ROOT_TTL, now).unwrap();
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

/// Runs a command off the async workers with `input` on its stdin; returns
/// (exit code, stdout, stderr).
pub async fn run_input(
    program: &str,
    args: Vec<String>,
    input: &[u8],
) -> (Option<i32>, String, String) {
    use std::io::Write;
    let program = program.to_owned();
    let input = input.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        // A program that has already given up may not read it all.
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(&input);
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// A TLS alert: its number (RFC 8446, section 6) and OpenSSL's name for it.
///
/// In TLS 1.3 a client certificate is checked after the client has finished
/// its side of the handshake. curl has sent its request by then, and a server
/// that closes with the request unread makes its kernel answer with a reset,
/// which can discard the alert before curl reads it (curl then reports
/// "getpeername() failed" or a reset, not the alert). Those alerts are read
/// with [`s_client_refusal`], which sends nothing; one sent during the
/// handshake ([`PROTOCOL_VERSION`]) reaches curl every time.
#[derive(Clone, Copy, Debug)]
pub struct Alert {
    pub number: u8,
    pub text: &'static str,
}

/// No client certificate.
pub const CERTIFICATE_REQUIRED: Alert = Alert {
    number: 116,
    text: "tlsv13 alert certificate required",
};
/// Outside the allow-list.
pub const ACCESS_DENIED: Alert = Alert {
    number: 49,
    text: "tlsv1 alert access denied",
};
/// Another CA's certificate.
pub const UNKNOWN_CA: Alert = Alert {
    number: 48,
    text: "tlsv1 alert unknown ca",
};
/// A chain under a CA with our CA's names but another key (rustls finds
/// the issuer by name, and its signature check fails: `BadSignature`).
pub const DECRYPT_ERROR: Alert = Alert {
    number: 51,
    text: "tlsv1 alert decrypt error",
};
/// Past notAfter, or before notBefore (rustls sends this alert for both).
pub const CERTIFICATE_EXPIRED: Alert = Alert {
    number: 45,
    text: "sslv3 alert certificate expired",
};
/// A protocol version the server does not speak (sent during the handshake).
pub const PROTOCOL_VERSION: Alert = Alert {
    number: 70,
    text: "tlsv1 alert protocol version",
};

/// What curl got (`curl_code`) is the refusal `alert`, sent during the
/// handshake: curl's exit code 35 ("SSL connect error"), the alert named in
/// its message, and nothing served.
#[track_caller]
pub fn assert_alert(got: &(Option<i32>, String, String), alert: Alert, why: &str) {
    let (code, out, err) = got;
    assert!(
        *code == Some(35) && err.contains(alert.text),
        "{why}: expected curl's exit code 35 and {:?}; got {code:?}: {err}{out}",
        alert.text
    );
    assert!(out.is_empty(), "{why}: refused, yet served: {out}");
}

/// `openssl s_client` to the server at `addr` (as `localhost`, verifying it
/// with `ca`), presenting the credentials in `creds` (the whole chain of
/// their tls.crt) when given, and sending nothing: how the server ends the
/// handshake. Returns (exit code, stdout, stderr).
pub async fn s_client_refusal(
    addr: SocketAddr,
    ca: &Path,
    creds: Option<&Path>,
) -> (Option<i32>, String, String) {
    let mut args: Vec<String> = vec![
        "20".into(),
        "openssl".into(),
        "s_client".into(),
        "-connect".into(),
        addr.to_string(),
        "-servername".into(),
        "localhost".into(),
        "-verify_return_error".into(),
        "-ign_eof".into(),
        "-CAfile".into(),
        p(ca),
    ];
    if let Some(dir) = creds {
        let crt = p(&dir.join("tls.crt"));
        args.extend([
            "-cert".into(),
            crt.clone(),
            "-cert_chain".into(),
            crt,
            "-key".into(),
            p(&dir.join("tls.key")),
        ]);
    }
    run_input("timeout", args, b"").await
}

/// What `s_client_refusal` got is the refusal `alert`: openssl's failure
/// (1; `timeout`'s 124 would be no answer at all), the alert's name and
/// number.
#[track_caller]
pub fn assert_refused(got: &(Option<i32>, String, String), alert: Alert, why: &str) {
    let (code, out, err) = got;
    let number = format!("SSL alert number {}", alert.number);
    assert!(
        *code == Some(1) && err.contains(alert.text) && err.contains(&number),
        "{why}: expected openssl s_client to fail with {:?} ({number}); got {code:?}: {err}{out}",
        alert.text
    );
}

/// What meshca-tls's reloads logged in this test process (one subscriber
/// for the whole process, set by the first test that asks: the reload
/// task runs on whichever worker thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: OnceLock<Logs> = OnceLock::new();

fn logs() -> &'static Logs {
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "meshca_tls::reload=info",
            ))
            .finish();
        // Nothing else in this test binary sets one.
        tracing::subscriber::set_global_default(subscriber)
            .expect("a global tracing subscriber was set already");
        logs
    })
}

/// Starts keeping what meshca-tls's reloads log (before the server whose
/// reloads a test waits for starts: what is logged before is not kept).
pub fn keep_reload_logs() {
    logs();
}

/// Waits until a reload has logged a line holding every one of `needles`
/// (the line names the files, so a test's own directory tells its lines
/// from other tests'); panics, with what was logged, after `limit`.
pub async fn reload_logged(needles: &[&str], limit: Duration) -> String {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let text = {
            let bytes = logs().0.lock().unwrap_or_else(|e| e.into_inner());
            String::from_utf8_lossy(&bytes).into_owned()
        };
        if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reload logged {needles:?} within {limit:?}; logged:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// curl against `url` with `extra`, as [`curl`] runs it; returns (exit code,
/// stdout, stderr).
pub async fn curl_code(url: &str, extra: &[String]) -> (Option<i32>, String, String) {
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--fail".into(),
        "--max-time".into(),
        "10".into(),
    ];
    args.extend_from_slice(extra);
    args.push(url.to_owned());
    run_input("curl", args, b"").await
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
