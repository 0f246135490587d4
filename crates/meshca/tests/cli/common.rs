//! Helpers shared by the integration tests: run the real binary and real
//! peers (openssl, curl, pkilint) in temporary directories.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
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

/// A loopback port that was free a moment ago, below the ephemeral range
/// and never handed out twice by this process (`meshca_testkit::free_port`).
/// Another process may still bind it first: start servers with
/// [`start_listening`] (or [`Server`]), which wait until the server itself
/// listens and start it again elsewhere when the port was taken.
pub fn free_port() -> u16 {
    meshca_testkit::free_port()
}

/// `n` distinct ports, as [`free_port`].
pub fn free_ports(n: usize) -> Vec<u16> {
    meshca_testkit::free_ports(n)
}

/// Waits (10 s at most) until something accepts connections on `port`.
/// That something may be another test's server that took the port: when
/// the listener is a child of this test, [`wait_for_listener`] checks that
/// it is that child.
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

/// Waits until `f()` holds, polling every 50 ms, for at most `limit`; fails
/// naming `what`. The readiness wait that replaces a fixed sleep: it
/// returns as soon as the state is there, and a state that never comes
/// fails instead of being asserted on too early.
#[track_caller]
pub fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sleeps until the wall clock is past `t` by more than a second (X.509
/// and token expiry times have one-second precision and are inclusive):
/// the wait for something to expire, computed from its own expiry time
/// (`validity(cert).1`, a token's `expires_at`) rather than guessed.
pub fn wait_past(t: std::time::SystemTime) {
    let until = t + Duration::from_millis(1100);
    while let Ok(left) = until.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left.max(Duration::from_millis(10)));
    }
}

/// Splits a PEM chain into its certificates' PEM texts.
pub fn split_pem(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .map(str::to_owned)
        .collect()
}

/// A child process ended when dropped, pass or fail, with everything it
/// started: its process group (it has one of its own when started by
/// [`spawn`] or [`spawn_cmd`]) and its descendants.
pub struct Child(pub std::process::Child);

impl Child {
    /// Ends it now (SIGKILL to it and what it started), and reaps it.
    pub fn end(&mut self) {
        meshca_testkit::end_child(&mut self.0);
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        meshca_testkit::end_child(&mut self.0);
    }
}

/// Starts `program` with `args` (stdin piped, output discarded) in a process
/// group of its own, ended when the returned guard is dropped.
pub fn spawn(program: &str, args: &[&str]) -> Child {
    spawn_cmd(
        Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Starts `cmd` in a process group of its own, listed with this process's
/// watchdog (which ends it should the test process die without dropping the
/// guard: a nextest timeout), ended with everything it started when the
/// returned guard is dropped. Every process a test starts goes through here
/// (or [`start_listening`], [`Server`]).
pub fn spawn_cmd(cmd: &mut Command) -> Child {
    let program = cmd.get_program().to_string_lossy().into_owned();
    Child(
        meshca_testkit::spawn_guarded(cmd)
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}")),
    )
}

/// Waits (10 s at most) until `child`, or a process it started, listens on
/// `port` (not merely something: another test's server may have taken the
/// port); fails at once, with its status, if it exits first.
pub fn wait_for_listener(child: &mut Child, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the process meant to listen on {port} exited: {status}");
        }
        if meshca_testkit::listening_in_tree(child.id(), port) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the process meant to listen on {port} did not within 10s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a server on `n` fresh ports that it is told on its command line:
/// `make(&ports)` builds the command, whose stdout and stderr are appended
/// to `log`. Waits (30 s at most) until the server, or a process it started,
/// listens on every one of `ports` and `ready(&ports)` holds. When it exits
/// first because a port was taken between choosing and binding ("address
/// already in use" in what it logged), it is started again on other ports;
/// any other exit fails the test with its log. Returns the running server,
/// ended when dropped, and its ports.
pub fn start_listening(
    n: usize,
    log: &Path,
    mut make: impl FnMut(&[u16]) -> Command,
    mut ready: impl FnMut(&[u16]) -> bool,
) -> (Child, Vec<u16>) {
    let mut taken = Vec::new();
    for _ in 0..5 {
        let ports = free_ports(n.max(1));
        let from = meshca_testkit::log_len(log);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = make(&ports);
        cmd.stdout(out.try_clone().unwrap()).stderr(out);
        let mut child = spawn_cmd(&mut cmd);
        let pid = child.id();
        let up = meshca_testkit::wait_until_listening(
            &mut child.0,
            ports[0],
            log,
            from,
            Duration::from_secs(30),
            || {
                ports[1..]
                    .iter()
                    .all(|p| meshca_testkit::listening_in_tree(pid, *p))
                    && ready(&ports)
            },
        );
        match up {
            Ok(()) => return (child, ports),
            Err(meshca_testkit::StartError::PortTaken(e)) => taken.push(e),
            Err(e) => panic!("{:?} did not start: {e}", cmd.get_program()),
        }
    }
    panic!(
        "the server's ports were taken five times:\n{}",
        taken.join("\n")
    );
}

/// A running `meshca serve`, ended (SIGKILL, with what it started) when
/// dropped.
pub struct Server {
    pub child: Option<std::process::Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts `meshca serve` on `dir` (initialising it when empty) on a free
    /// port, and waits until it is ready (on another port when the first was
    /// taken meanwhile).
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::launch(dir, None, |port| Server::serve_cmd(dir, port, extra))
    }

    /// `meshca serve` on `port` (a restart on the port clients know): when
    /// another process holds the port, it tries again for 15 s.
    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> Server {
        Server::launch(dir, Some(port), |port| Server::serve_cmd(dir, port, extra))
    }

    fn serve_cmd(dir: &Path, port: u16, extra: &[&str]) -> Command {
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = meshca();
        cmd.args(["serve", "--dir", dir.to_str().unwrap(), "--listen", &listen])
            .args(extra);
        cmd
    }

    /// `meshca serve` on `dir` run by `sh -c` after `shell` (limits, traps).
    pub fn start_under(dir: &Path, shell: &str) -> Server {
        Server::start_cmd(dir, |port| {
            let line = format!(
                "{shell}; exec {} serve --dir {} --listen 127.0.0.1:{port}",
                env!("CARGO_BIN_EXE_meshca"),
                dir.display()
            );
            let mut cmd = Command::new("sh");
            cmd.args(["-c", &line]);
            cmd
        })
    }

    /// A server on `dir` started by the command `make(port)` builds: `meshca
    /// serve --dir DIR --listen 127.0.0.1:PORT` under a wrapper (`faketime`,
    /// `sh -c`, ...). Its process group is its own, so the wrapper and the
    /// server end together.
    pub fn start_cmd(dir: &Path, make: impl FnMut(u16) -> Command) -> Server {
        Server::launch(dir, None, make)
    }

    fn launch(dir: &Path, fixed: Option<u16>, mut make: impl FnMut(u16) -> Command) -> Server {
        // Every attempt appends to the log of the first (named after its
        // port), so that what the server said at its first start (the CA it
        // created, the CA it joined) stays in `log`.
        let mut log: Option<PathBuf> = None;
        let deadline = Instant::now() + Duration::from_secs(if fixed.is_some() { 15 } else { 60 });
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = fixed.unwrap_or_else(free_port);
            let log = log
                .get_or_insert_with(|| dir.with_extension(format!("serve-{port}.log")))
                .clone();
            let from = if attempts == 1 {
                0
            } else {
                meshca_testkit::log_len(&log)
            };
            let out = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(attempts == 1)
                .append(attempts > 1)
                .open(&log)
                .unwrap();
            let mut cmd = make(port);
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(out);
            let mut child = meshca_testkit::spawn_guarded(&mut cmd)
                .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
            let ca = dir.join("admin/ca.crt");
            let up = meshca_testkit::wait_until_listening(
                &mut child,
                port,
                &log,
                from,
                Duration::from_secs(20),
                || ready(&ca, port),
            );
            match up {
                Ok(()) => {
                    return Server {
                        child: Some(child),
                        dir: dir.to_owned(),
                        port,
                        log,
                    };
                }
                Err(meshca_testkit::StartError::PortTaken(_))
                    if attempts < 8 && Instant::now() < deadline =>
                {
                    if fixed.is_some() {
                        // Its own port: wait for whoever holds it.
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
                Err(e) => {
                    meshca_testkit::end_child(&mut child);
                    if let Ok(bytes) = std::fs::read(&log) {
                        keep_output("serve.log", &bytes);
                    }
                    sweep(dir);
                    panic!("meshca serve on port {port} did not become ready: {e}");
                }
            }
        }
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

    /// Ends the server now: SIGKILL (no chance to flush anything) to it and
    /// whatever it started, then reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            meshca_testkit::end_child(&mut c);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The metrics it ended with, its log, audit log and keys: for the
        // leak scan.
        if self.child.is_some()
            && let Ok(out) = Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(self.dir.join("admin/ca.crt"))
                .arg(format!("{}/metrics", self.url()))
                .output()
        {
            keep_output("metrics", &out.stdout);
        }
        self.kill();
        if let Ok(log) = std::fs::read(&self.log) {
            keep_output("serve.log", &log);
        }
        sweep(&self.dir);
    }
}

/// Whether the meshca on `port` answers 200 on `/readyz` over TLS verified
/// with `ca` (the CA of the data directory it was started on: a server of
/// another test does not pass).
fn ready(ca: &Path, port: u16) -> bool {
    ca.exists()
        && Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .arg("--cacert")
            .arg(ca)
            .arg(format!("https://localhost:{port}/readyz"))
            .output()
            .is_ok_and(|o| o.stdout == b"200")
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

/// `text` as JSON, or a panic quoting it.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// An RFC 3339 time of an API answer (`expires_at`, `not_after`).
pub fn rfc3339(v: &serde_json::Value) -> std::time::SystemTime {
    let at = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{at:?}: {e}"))
        .into()
}

/// How long after `opened` the server closed `s` (EOF, or a reset; what it
/// sends before, a 408 say, is read and dropped); `None` when it was still
/// open `limit` after `opened`. One look at least: with no time left, an
/// already closed socket counts.
pub fn closed_after(
    s: &mut std::net::TcpStream,
    opened: std::time::Instant,
    limit: Duration,
) -> Option<Duration> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(opened.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(opened.elapsed()),
        }
        if opened.elapsed() >= limit {
            return None;
        }
    }
}

/// A data directory made by `meshca init` at `dir` whose meshca.toml has
/// `top` (top-level settings) before what init wrote, and, when `limits` is
/// not empty, a `[limits]` table of those lines at the end.
pub fn init_with(dir: &Path, top: &str, limits: &str) {
    ok(&["init", "--dir", dir.to_str().unwrap()]);
    let toml = dir.join("meshca.toml");
    let written = std::fs::read_to_string(&toml).unwrap();
    let mut text = format!("{top}{written}");
    if !limits.is_empty() {
        text.push_str(&format!("\n[limits]\n{limits}"));
    }
    std::fs::write(&toml, text).unwrap();
}

/// Asserts that the `--http-redirect` listener on `redirect` sends a
/// request to the same path on `srv`'s HTTPS port.
pub fn assert_redirects(srv: &Server, redirect: u16) {
    let out = tool(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &format!("http://localhost:{redirect}/v1/ca?x=1"),
        ],
    );
    assert_eq!(out, format!("301 https://localhost:{}/v1/ca?x=1", srv.port));
}
