//! Helpers shared by the integration tests: run the real binary and real
//! peers (openssl, curl, pkilint) in temporary directories.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn meshca() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshca"));
    c.env_remove("MESHCA_DIR");
    c
}

/// Runs meshca with `args` and returns its output.
pub fn run(args: &[&str]) -> Output {
    let out = meshca().args(args).output().expect("run meshca");
    keep_output("cli-stderr", &out.stderr);
    out
}

/// Runs meshca and requires success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "meshca {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs meshca and requires failure whose stderr contains every one of `needles`.
pub fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "meshca {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "meshca {args:?} panicked: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "meshca {args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
    stderr
}

/// Runs a real tool and requires success; returns stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? ./test.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One extension of a PEM certificate as openssl prints it
/// (`openssl x509 -noout -ext NAME`).
pub fn cert_ext(cert: &Path, name: &str) -> String {
    tool(
        "openssl",
        &[
            "x509",
            "-in",
            cert.to_str().unwrap(),
            "-noout",
            "-ext",
            name,
        ],
    )
}

/// A temporary directory with an initialised CA in `dir/ca`.
pub struct Ca {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Ca {
    pub fn new(extra: &[&str]) -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let mut args = vec!["init", "--dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(&args);
        Ca { tmp, dir }
    }

    pub fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn p(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_owned()
    }

    /// `meshca issue` into `tmp/<out>`; returns the out dir.
    pub fn issue(&self, name: &str, out: &str, extra: &[&str]) -> PathBuf {
        let outp = self.p(out);
        let mut args = vec!["--dir", self.d(), "issue", name, "--out", &outp];
        args.extend_from_slice(extra);
        ok(&args);
        self.path(out)
    }

    /// The hierarchy directory `ca/<id>`.
    pub fn hierarchy_dir(&self) -> PathBuf {
        let mut entries = std::fs::read_dir(self.dir.join("ca")).unwrap();
        entries.next().unwrap().unwrap().path()
    }

    pub fn count(&self) -> usize {
        let out = ok(&["--dir", self.d(), "list", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .len()
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        sweep(self.tmp.path());
    }
}

/// A temporary directory swept for the secret-leak scan when dropped.
pub struct Scratch(tempfile::TempDir);

pub fn scratch() -> Scratch {
    Scratch(tempfile::tempdir().unwrap())
}

impl std::ops::Deref for Scratch {
    type Target = tempfile::TempDir;
    fn deref(&self) -> &tempfile::TempDir {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        sweep(self.0.path());
    }
}

/// Where the suite keeps, for the secret-leak scan (`leaks.rs`, run by
/// `./test.sh` after everything else), what it produced (`out`: logs,
/// audit lines, metrics, error bodies, CLI errors) and the secrets it
/// handled (`secrets`: private keys, tokens, seal keys).
pub fn leakscan_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("leakscan")
        .join(kind)
}

fn keep(kind: &str, what: &str, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    if bytes.is_empty() {
        return;
    }
    let dir = leakscan_dir(kind);
    let _ = std::fs::create_dir_all(&dir);
    let what: String = what
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let file = dir.join(format!(
        "{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
    {
        let _ = f.write_all(bytes);
    }
}

/// A file for a meshca process's stderr that goes straight to the leak scan
/// (for processes whose output the test does not read).
pub fn kept_log(what: &str) -> Stdio {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = leakscan_dir("out");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!(
        "{}-log{}-{what}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::File::create(file).map_or_else(|_| Stdio::null(), Stdio::from)
}

/// Something meshca said (a log, an error body, metrics), for the leak scan.
pub fn keep_output(what: &str, bytes: &[u8]) {
    keep("out", what, bytes);
}

/// A secret the suite handled, which no output may contain.
pub fn keep_secret(what: &str, bytes: &[u8]) {
    keep("secrets", what, bytes);
}

/// Files under `dir` for the leak scan: `*.log` files (server, agent, proxy
/// and audit logs) are outputs; private keys, token files and seal keys are
/// secrets.
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let path = e.path();
        if kind.is_dir() {
            sweep(&path);
            continue;
        }
        if !kind.is_file() || e.metadata().map_or(true, |m| m.len() > 16 << 20) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if name.ends_with(".log") {
            keep_output(&name, &bytes);
        } else if bytes.windows(16).any(|w| w == b"PRIVATE KEY-----")
            || ["token", "seal", "secret"].iter().any(|k| name.contains(k))
        {
            keep_secret(&name, &bytes);
        }
    }
}

pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listened on port {port} within 10s");
}

/// Splits a PEM chain into its certificates' PEM texts.
pub fn split_pem(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .map(str::to_owned)
        .collect()
}

/// A child process killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(program: &str, args: &[&str]) -> Child {
    Child(
        Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}")),
    )
}

/// A running `meshca serve`, killed when dropped.
pub struct Server {
    pub child: Option<std::process::Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts `meshca serve` on `dir` (initialising it when empty) on a free port.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let port = free_port();
        Server::start_on(dir, port, extra)
    }

    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> Server {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", "--dir", dir.to_str().unwrap(), "--listen", &listen];
        args.extend_from_slice(extra);
        let mut cmd = meshca();
        cmd.args(&args);
        Server::launch(dir, port, cmd)
    }

    /// `meshca serve` on `dir` run by `sh -c` after `shell` (limits, traps).
    pub fn start_under(dir: &Path, shell: &str) -> Server {
        let port = free_port();
        let line = format!(
            "{shell}; exec {} serve --dir {} --listen 127.0.0.1:{port}",
            env!("CARGO_BIN_EXE_meshca"),
            dir.display()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &line]);
        Server::launch(dir, port, cmd)
    }

    fn launch(dir: &Path, port: u16, mut cmd: Command) -> Server {
        let log = dir.with_extension(format!("serve-{port}.log"));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Server {
            child: Some(child),
            dir: dir.to_owned(),
            port,
            log,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(self.dir.join("admin/ca.crt"))
                .arg(format!("https://localhost:{}/readyz", self.port))
                .output()
                .unwrap();
            if out.stdout == b"200" {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "meshca serve did not become ready: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// `meshca --server URL --dir DIR <args>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = meshca()
            .args(["--server", &self.url(), "--dir", self.dir.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        keep_output("cli-stderr", &out.stderr);
        if args.starts_with(&["token", "create"]) {
            keep_secret("token", &out.stdout);
        }
        out
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "meshca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// curl against the API: returns (HTTP status, body). `auth` is extra
    /// curl arguments (client certificate, bearer token).
    pub fn curl(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: &[String],
    ) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "--cacert",
        ])
        .arg(self.dir.join("admin/ca.crt"))
        .args(auth);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = cmd.arg(format!("{}{path}", self.url())).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
        let code = code.trim().parse().unwrap_or(0);
        if code >= 400 || path.starts_with("/metrics") {
            keep_output("http-body", body.as_bytes());
        }
        // Only an answer that made a token holds one (a refusal's body is
        // kept as output above, and is not a secret).
        if path.starts_with("/v1/tokens") && method == "POST" && (200..300).contains(&code) {
            keep_secret("token", body.as_bytes());
        }
        (code, body.to_owned())
    }

    /// curl arguments presenting the admin certificate.
    pub fn admin(&self) -> Vec<String> {
        cert_args(&self.dir.join("admin"))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The metrics it ended with, its log, audit log and keys: for the
        // leak scan.
        if self.child.is_some() {
            if let Ok(out) = Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(self.dir.join("admin/ca.crt"))
                .arg(format!("{}/metrics", self.url()))
                .output()
            {
                keep_output("metrics", &out.stdout);
            }
        }
        self.kill();
        if let Ok(log) = std::fs::read(&self.log) {
            keep_output("serve.log", &log);
        }
        sweep(&self.dir);
    }
}

/// curl arguments presenting the credentials of a kubernetes.io/tls directory.
pub fn cert_args(dir: &Path) -> Vec<String> {
    vec![
        "--cert".into(),
        dir.join("tls.crt").to_str().unwrap().into(),
        "--key".into(),
        dir.join("tls.key").to_str().unwrap().into(),
    ]
}

pub fn bearer(token: &str) -> Vec<String> {
    vec!["-H".into(), format!("Authorization: Bearer {token}")]
}

/// A CSR made by openssl, as a JSON string value, and its key file.
pub fn openssl_csr(dir: &Path, name: &str, extra: &[&str]) -> (String, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
        "-subj",
        "/CN=whatever",
    ];
    args.extend_from_slice(extra);
    tool("openssl", &args);
    (
        serde_json::to_string(&std::fs::read_to_string(&csr).unwrap()).unwrap(),
        key,
    )
}

/// notBefore and notAfter of the first certificate in a PEM file.
pub fn validity(cert: &Path) -> (std::time::SystemTime, std::time::SystemTime) {
    let der = meshca_pki::parse_certs(&std::fs::read(cert).unwrap()).unwrap();
    let facts = meshca_pki::cert_facts(&der[0]).unwrap();
    (facts.not_before.into(), facts.not_after.into())
}

/// notAfter - notBefore of the first certificate in a PEM file.
pub fn lifetime(cert: &Path) -> Duration {
    let (from, to) = validity(cert);
    to.duration_since(from).unwrap()
}

/// Asserts that `got` is `want`, to the second (X.509 times have no finer grain).
#[track_caller]
pub fn assert_about(got: Duration, want: Duration, what: &str) {
    let diff = got.abs_diff(want);
    assert!(
        diff <= Duration::from_secs(1),
        "{what}: {got:?}, expected {want:?}"
    );
}
