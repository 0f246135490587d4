//! `meshca proxy` with real peers: Python's `http.server` and small Python
//! TCP programs as targets, curl and Python's `ssl` as clients, openssl for
//! a foreign CA.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::refusal::{
    ACCESS_DENIED, CERTIFICATE_REQUIRED, HANDSHAKE_FAILURE, PROTOCOL_VERSION, UNKNOWN_CA,
    curl_alert,
};

/// A running `meshca proxy`, ended with everything it started when
/// dropped, pass or fail.
pub(crate) struct Proxy {
    child: Child,
    log: PathBuf,
}

fn proxy_cmd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut cmd = meshca();
    cmd.arg("proxy")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

impl Proxy {
    /// `meshca proxy ARGS` on `n` fresh ports, `args(&ports)` naming them:
    /// waits until it listens on every one, and starts it again on other
    /// ports when one was taken between choosing and binding. `log` starts
    /// empty (what an earlier proxy left there goes to the leak scan).
    pub(crate) fn start_on(
        n: usize,
        log: PathBuf,
        mut args: impl FnMut(&[u16]) -> Vec<String>,
    ) -> (Proxy, Vec<u16>) {
        if let Ok(earlier) = std::fs::read(&log) {
            keep_output("proxy.log", &earlier);
            let _ = std::fs::remove_file(&log);
        }
        let (child, ports) = start_listening(n, &log, |ports| proxy_cmd(&args(ports)), |_| true);
        (Proxy { child, log }, ports)
    }

    /// `meshca proxy server` on a free loopback port in front of `target`,
    /// serving `certs`, with `extra` flags; logs to `ca`'s `proxy.log`.
    /// Returns once the proxy listens on the port.
    pub(crate) fn server(ca: &Ca, target: &str, certs: &Path, extra: &[&str]) -> (Proxy, u16) {
        let (proxy, ports) = Proxy::start_on(1, ca.path("proxy.log"), |ports| {
            let mut args: Vec<String> = vec![
                "server".into(),
                "--listen".into(),
                format!("127.0.0.1:{}", ports[0]),
                "--target".into(),
                target.into(),
                "--certs".into(),
                p(certs).into(),
            ];
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            args
        });
        (proxy, ports[0])
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Owned copies of `args` (for [`Proxy::start_on`]).
pub(crate) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// Reads `pipe` to its end on a thread of its own (so that a full pipe
/// never stalls the child while the test waits for something else).
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Option<std::thread::JoinHandle<Vec<u8>>> {
    pipe.map(|mut r| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = r.read_to_end(&mut bytes);
            bytes
        })
    })
}

fn joined(reader: Option<std::thread::JoinHandle<Vec<u8>>>) -> String {
    reader
        .map(|r| String::from_utf8_lossy(&r.join().unwrap()).into_owned())
        .unwrap_or_default()
}

/// Waits (at most `limit`) for a guarded child to exit, reading its piped
/// stdout meanwhile; returns its status and what it wrote. Fails, naming
/// `what`, when it has not exited in time (its guard then ends it). What
/// it left running in its group is ended with it.
pub(crate) fn output_of(child: &mut Child, what: &str, limit: Duration) -> (ExitStatus, String) {
    let out = drain(child.0.stdout.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    child.end();
    (status, joined(out))
}

/// Runs `cmd` guarded (ended with what it started when the test ends, pass
/// or fail), its output captured, for at most `limit`: the bounded,
/// guarded `Command::output`.
pub(crate) fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{:?}", cmd.get_program());
    let mut child = spawn_cmd(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let err = drain(child.0.stderr.take());
    let (status, stdout) = output_of(&mut child, &what, limit);
    Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: joined(err).into_bytes(),
    }
}

/// `tool`, guarded and bounded by `limit`: runs `program` and requires
/// success; returns stdout.
pub(crate) fn tool_within(program: &str, args: &[&str], limit: Duration) -> String {
    let out = run_within(Command::new(program).args(args), limit);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Python's web server serving `dir/index.html` ("hello through the
/// proxy"), with a listen backlog of 4096 rather than 5: the proxy opens a
/// target connection per client, a thousand at once in the hostile tests.
/// Returns once it listens (on another port when the first was taken).
pub(crate) fn http_site(dir: &Path) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("index.html"), "hello through the proxy\n").unwrap();
    let server_py = "import functools, sys, http.server as h\n\
        class S(h.ThreadingHTTPServer):\n    request_queue_size = 4096\n\
        handler = functools.partial(h.SimpleHTTPRequestHandler, directory=sys.argv[2])\n\
        S(('127.0.0.1', int(sys.argv[1])), handler).serve_forever()\n";
    let (child, ports) = start_listening(
        1,
        &dir.with_extension("log"),
        |ports| {
            let mut cmd = Command::new("python3");
            cmd.args(["-c", server_py, &ports[0].to_string(), p(dir)])
                .stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    (child, ports[0])
}

/// A Python program listening on a fresh port, given as its one argument;
/// returns once it listens (on another port when the first was taken). Its
/// output goes to `log`.
fn python_target(script: &str, log: &Path) -> (Child, u16) {
    let (child, ports) = start_listening(
        1,
        log,
        |ports| {
            let mut cmd = Command::new("python3");
            cmd.args(["-c", script, &ports[0].to_string()])
                .stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    (child, ports[0])
}

fn curl(url: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn creds(dir: &Path) -> Vec<String> {
    vec![
        "--cacert".into(),
        p(&dir.join("ca.crt")).into(),
        "--cert".into(),
        p(&dir.join("tls.crt")).into(),
        "--key".into(),
        p(&dir.join("tls.key")).into(),
    ]
}

fn metrics(port: u16) -> String {
    curl(&format!("http://127.0.0.1:{port}/metrics"), &[]).1
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {secs}s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn only_allowed_peers_get_through_and_refusals_are_counted() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let bank = ca.issue("teller", "bank", &["-n", "bank"]);
    let foreign = Ca::new(&[]);
    let stranger = foreign.issue("cli", "stranger", &[]);
    let (_site, site_port) = http_site(&ca.path("site"));
    let (proxy, ports) = Proxy::start_on(2, ca.path("proxy.log"), |ports| {
        strings(&[
            "server",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &format!("127.0.0.1:{site_port}"),
            "--certs",
            p(&web),
            "--allow",
            "spiffe://cluster.local/ns/default/*",
            "--health",
            &format!("127.0.0.1:{}", ports[1]),
        ])
    });
    let (port, health) = (ports[0], ports[1]);
    let url = format!("https://localhost:{port}/index.html");
    // curl arguments presenting `dir`'s credentials, trusting the proxy's CA.
    let presenting = |dir: &Path| {
        let mut args = creds(dir);
        args[1] = p(&web.join("ca.crt")).into();
        args
    };
    let as_ = |dir: &Path| {
        curl(
            &url,
            &presenting(dir)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    };
    let (ok, body) = as_(&cli);
    assert!(ok && body.contains("hello through the proxy"), "{body}");
    // Each refused in the handshake, with the alert that names the reason.
    // (HTTP/2 is not offered in ALPN, or curl would speak it to an HTTP/1 target.)
    curl_alert(
        &url,
        &["--cacert", p(&web.join("ca.crt"))],
        CERTIFICATE_REQUIRED,
        "no client certificate",
    );
    curl_alert(
        &url,
        &presenting(&bank),
        ACCESS_DENIED,
        "a peer outside the allow-list",
    );
    curl_alert(
        &url,
        &presenting(&stranger),
        UNKNOWN_CA,
        "a certificate of another CA",
    );
    let mut tls12 = presenting(&cli);
    tls12.extend(["--tls-max".into(), "1.2".into()]);
    curl_alert(
        &url,
        &tls12,
        PROTOCOL_VERSION,
        "TLS 1.2 (refused by default)",
    );

    let m = metrics(health);
    for line in [
        r#"meshca_proxy_connections_total{route="server",outcome="proxied"} 1"#,
        r#"reason="no_client_certificate"} 1"#,
        r#"reason="not_allowed"} 1"#,
        r#"reason="untrusted"} 1"#,
        r#"reason="incompatible"} 1"#,
        r#"peer="spiffe://cluster.local/ns/default/sa/cli"} 1"#,
    ] {
        assert!(m.contains(line), "{line} missing in\n{m}");
    }
    let (ok, body) = curl(&format!("http://127.0.0.1:{health}/healthz"), &["-f"]);
    assert!(ok && body.contains("route server: ok"), "{body}");
    let log = proxy.log();
    assert!(
        log.contains("not_allowed") && log.contains("spiffe://cluster.local/ns/bank/sa/teller"),
        "refusals are logged with the identity: {log}"
    );
    // And the proxy still lets the allowed peer through.
    let (ok, body) = as_(&cli);
    assert!(
        ok && body.contains("hello through the proxy"),
        "after the refusals: {body}"
    );
}

#[test]
fn tls12_is_accepted_only_with_the_flag_and_only_with_aead_suites() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let (_site, site_port) = http_site(&ca.path("site"));
    let (_proxy, port) = Proxy::server(&ca, &format!("127.0.0.1:{site_port}"), &web, &["--tls12"]);
    let url = format!("https://localhost:{port}/index.html");
    let with = |extra: &[&str]| {
        let mut args = creds(&cli);
        args[1] = p(&web.join("ca.crt")).into();
        args.push("-v".into());
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        curl(&url, &args)
    };
    // curl (OpenSSL) limited to TLS 1.2 gets through, with an ECDHE AEAD suite.
    let (ok, out) = with(&["--tlsv1.2", "--tls-max", "1.2"]);
    assert!(ok && out.contains("hello through the proxy"), "{out}");
    assert!(out.contains("TLSv1.2"), "{out}");
    assert!(
        out.contains("ECDHE-ECDSA-AES") && out.contains("GCM")
            || out.contains("ECDHE-ECDSA-CHACHA20-POLY1305"),
        "an ECDHE AEAD suite: {out}"
    );
    // TLS 1.3 stays the first choice.
    let (ok, out) = with(&[]);
    assert!(ok && out.contains("TLSv1.3"), "{out}");
    // Only AEAD suites: a client that offers nothing but CBC is refused,
    // no suite in common.
    let mut cbc = creds(&cli);
    cbc[1] = p(&web.join("ca.crt")).into();
    cbc.extend(
        [
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            "--ciphers",
            "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA",
        ]
        .map(String::from),
    );
    curl_alert(&url, &cbc, HANDSHAKE_FAILURE, "CBC suites only");
    // The proxy goes on serving TLS 1.2 with AEAD.
    let (ok, out) = with(&["--tlsv1.2", "--tls-max", "1.2"]);
    assert!(
        ok && out.contains("hello through the proxy"),
        "after the refusal: {out}"
    );
}

#[test]
fn client_route_to_server_route_end_to_end() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let (_site, site_port) = http_site(&ca.path("site"));
    let config = ca.path("proxy.toml");
    let write_config = |sport: u16, cport: u16, wrong_port: u16, health: u16| {
        std::fs::write(
            &config,
            format!(
                r#"health = "127.0.0.1:{health}"
[[route]]
name = "front"
side = "server"
listen = "127.0.0.1:{sport}"
target = "127.0.0.1:{site_port}"
certs = "{web}"
allow = ["spiffe://cluster.local/ns/default/sa/cli"]

[[route]]
name = "out"
side = "client"
listen = "127.0.0.1:{cport}"
target = "localhost:{sport}"
certs = "{cli}"
server_id = "spiffe://cluster.local/ns/default/sa/web"

[[route]]
name = "wrong"
side = "client"
listen = "127.0.0.1:{wrong_port}"
target = "localhost:{sport}"
certs = "{cli}"
server_id = "spiffe://cluster.local/ns/default/sa/db"
"#,
                web = p(&web),
                cli = p(&cli),
            ),
        )
        .unwrap();
    };
    let (proxy, ports) = Proxy::start_on(4, ca.path("proxy.log"), |ports| {
        write_config(ports[0], ports[1], ports[2], ports[3]);
        strings(&["run", "--config", p(&config)])
    });
    let (cport, wrong_port, health) = (ports[1], ports[2], ports[3]);
    let (ok, body) = curl(&format!("http://127.0.0.1:{cport}/index.html"), &[]);
    assert!(ok && body.contains("hello through the proxy"), "{body}");
    // A server with another identity: the client route refuses it in the
    // handshake (the front route is told so by the alert) and closes its
    // plaintext client's connection without a byte. The client sends
    // nothing, so the close is an orderly one (curl's request would race it
    // into a reset or an empty reply).
    let got = tool_within(
        "python3",
        &[
            "-c",
            "import socket,sys; c=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10); print(len(c.recv(100)))",
            &wrong_port.to_string(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        got.trim(),
        "0",
        "a server with another identity must be refused, nothing passed"
    );
    wait_for("the refusal counted on both routes", 5, || {
        let m = metrics(health);
        m.contains(r#"route="wrong",reason="bad_certificate"} 1"#)
            && m.contains(r#"route="front",reason="peer_refused"} 1"#)
    });
    assert!(
        proxy
            .log()
            .contains("refused: invalid peer certificate: NotValidForName"),
        "the refusal is logged with its reason: {}",
        proxy.log()
    );
    let m = metrics(health);
    assert!(m.contains(r#"route="front",outcome="proxied"}"#), "{m}");
    assert!(
        m.contains(r#"route="out",peer="spiffe://cluster.local/ns/default/sa/web"}"#),
        "{m}"
    );
    let (ok, body) = curl(&format!("http://127.0.0.1:{cport}/index.html"), &[]);
    assert!(
        ok && body.contains("hello through the proxy"),
        "after the refusal: {body}"
    );

    // A bad file is refused by name, before anything listens.
    std::fs::write(&config, "[[route]]\nname = \"x\"\nside = \"server\"\n").unwrap();
    fails(
        &["proxy", "run", "--config", p(&config)],
        &["proxy.toml", "listen"],
    );
    fails(
        &[
            "proxy",
            "client",
            "--listen",
            "127.0.0.1:1",
            "--target",
            "localhost:2",
            "--certs",
            p(&cli),
        ],
        &["server_id"],
    );
    fails(
        &[
            "proxy",
            "server",
            "--listen",
            "127.0.0.1:1",
            "--target",
            "localhost:2",
            "--certs",
            p(&ca.path("nowhere")),
        ],
        &["nowhere"],
    );
}

/// A target that reads until the client half-closes, then answers with
/// the count and SHA-256 of what it read and a tail of its own, and closes.
const HASH_TARGET: &str = r#"
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
while True:
    c, _ = s.accept()
    h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b); n += len(b)
    c.sendall(f"{n} {h.hexdigest()}\n".encode() + b"tail after half-close\n")
    c.close()
"#;

/// Sends N MiB through host:port, half-closes, prints what came back and
/// the hash of what it sent. A socket operation that waits 30 s is a
/// failure (the exception exits non-zero), not a hang.
const HASH_CLIENT: &str = r#"
import hashlib, socket, sys
host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
h = hashlib.sha256(); c = socket.create_connection((host, port), timeout=30)
for i in range(mib):
    chunk = i.to_bytes(8, "big") + base[8:]
    c.sendall(chunk); h.update(chunk)
c.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = c.recv(65536)
    if not b: break
    got += b
print(f"sent {mib << 20} {h.hexdigest()}")
print(got.decode())
"#;

#[test]
fn half_close_and_a_gibibyte_arrive_byte_exact() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let (_target, target_port) = python_target(HASH_TARGET, &ca.path("target.log"));
    let (_server, sport) = Proxy::start_on(1, ca.path("server.log"), |ports| {
        strings(&[
            "server",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &format!("127.0.0.1:{target_port}"),
            "--certs",
            p(&web),
        ])
    });
    let sport = sport[0];
    let (_client, cport) = Proxy::start_on(1, ca.path("client.log"), |ports| {
        strings(&[
            "client",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &format!("localhost:{sport}"),
            "--certs",
            p(&cli),
            "--server-id",
            "web.default.svc",
        ])
    });
    let cport = cport[0];
    let out = tool_within(
        "python3",
        &["-c", HASH_CLIENT, "127.0.0.1", &cport.to_string(), "1024"],
        Duration::from_secs(300),
    );
    let mut lines = out.lines();
    let sent = lines
        .next()
        .unwrap()
        .strip_prefix("sent ")
        .unwrap()
        .to_owned();
    let echoed = lines.next().unwrap();
    assert_eq!(
        echoed, sent,
        "what the target read must be what was sent: {out}"
    );
    assert!(
        out.contains("tail after half-close"),
        "the answer after the half-close must arrive: {out}"
    );
}

/// A target that accepts and never reads.
const STUCK_TARGET: &str = r#"
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
held = []
while True:
    c, _ = s.accept(); held.append(c)
"#;

/// Writes until the writer is made to wait, and prints how much got out by
/// then: a send that cannot go on for 2 s is the backpressure looked for.
/// One that never has to wait stops at 256 MiB (and prints that). A
/// connection reset before a single byte got out is tried again once; a
/// reset after bytes moved fails, and so does a second reset before any
/// did.
const PUSH_CLIENT: &str = r#"
import socket, sys, time
limit = 256 << 20
for attempt in range(2):
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    c.settimeout(2)
    n = 0; block = b"x" * 65536
    try:
        while n < limit:
            try:
                n += c.send(block)
            except socket.timeout:
                break
        break
    except (ConnectionResetError, BrokenPipeError) as e:
        if n:
            sys.exit(f"the connection was reset after {n} bytes had moved: {e!r}")
        print(f"reset before any byte moved (attempt {attempt + 1}): {e!r}", file=sys.stderr)
        time.sleep(0.5)
else:
    sys.exit("every attempt was reset before a byte moved")
print(n)
"#;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn slow_targets_idle_connections_and_shutdown() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);

    // Backpressure: a target that never reads makes the writer wait; the
    // proxy holds at most its buffers, not what the client would send.
    let (_stuck, stuck) = python_target(STUCK_TARGET, &ca.path("stuck.log"));
    let (server, sport) = Proxy::start_on(1, ca.path("server.log"), |ports| {
        strings(&[
            "server",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &format!("127.0.0.1:{stuck}"),
            "--certs",
            p(&web),
            "--idle-timeout",
            "2s",
            "--shutdown-grace",
            "5s",
        ])
    });
    let sport = sport[0];
    let (client, cport) = Proxy::start_on(1, ca.path("client.log"), |ports| {
        strings(&[
            "client",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &format!("localhost:{sport}"),
            "--certs",
            p(&cli),
            "--server-id",
            "spiffe://cluster.local/ns/default/sa/web",
        ])
    });
    let cport = cport[0];
    let before = rss_kib(server.pid()) + rss_kib(client.pid());
    let pushed: u64 = tool_within(
        "python3",
        &["-c", PUSH_CLIENT, &cport.to_string()],
        Duration::from_secs(120),
    )
    .trim()
    .parse()
    .unwrap();
    let after = rss_kib(server.pid()) + rss_kib(client.pid());
    // Bytes did move (kernel buffers on the way fill up first) and then
    // stopped: the writer was made to wait.
    assert!(
        pushed >= 1 << 20,
        "only {pushed} bytes got out: nothing was pushed through the proxies"
    );
    assert!(
        pushed < 64 << 20,
        "the proxies took {pushed} bytes for a target that reads nothing"
    );
    assert!(
        after < before + 32 * 1024,
        "the proxies grew from {before} KiB to {after} KiB"
    );

    // Idle: a connection with no traffic is closed after --idle-timeout
    // (2 s): the client sees the close (0 bytes) before its own timeout of
    // 15 s, which it reports as a failure.
    let out = tool_within(
        "python3",
        &[
            "-c",
            "import socket,sys\nc=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=15)\ntry:\n    print(len(c.recv(10)))\nexcept socket.timeout:\n    print('still open after 15 s')",
            &cport.to_string(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.trim(), "0", "the idle connection must be closed");

    // SIGTERM: new connections are refused at once, an open one may finish
    // within the grace period, then the process exits.
    let (_site, site_port) = http_site(&ca.path("site"));
    let (mut graceful, gport) = Proxy::start_on(1, ca.path("graceful.log"), |ports| {
        strings(&[
            "server",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &format!("127.0.0.1:{site_port}"),
            "--certs",
            p(&web),
            "--shutdown-grace",
            "10s",
        ])
    });
    let gport = gport[0];
    // An open TLS connection that sends its request when told to (a line
    // on its stdin): after the SIGTERM. Its socket gives up after 20 s.
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
c = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20), server_hostname="localhost")
print("connected", flush=True)
sys.stdin.readline()
c.sendall(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
data = b""
while True:
    b = c.recv(65536)
    if not b: break
    data += b
print(data.decode().splitlines()[0])
"#;
    let mut late = spawn_cmd(
        Command::new("python3")
            .args([
                "-c",
                script,
                &gport.to_string(),
                p(&web.join("ca.crt")),
                p(&cli.join("tls.crt")),
                p(&cli.join("tls.key")),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(ca.path("late.log")).unwrap()),
    );
    let mut said = BufReader::new(late.0.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "connected",
        "the client did not connect: {}",
        std::fs::read_to_string(ca.path("late.log")).unwrap_or_default()
    );
    Command::new("kill")
        .args(["-TERM", &graceful.pid().to_string()])
        .status()
        .unwrap();
    // It closes its listeners, then says how many connections it waits for.
    wait_for("the proxy to stop accepting", 10, || {
        graceful
            .log()
            .contains("letting 1 open connection(s) finish")
    });
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", gport)).is_err(),
        "the listener must close on SIGTERM"
    );
    // Now the open connection sends its request, and is answered.
    late.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut text = String::new();
    said.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("HTTP/1.0 200"),
        "the open connection must finish: {text}{}",
        std::fs::read_to_string(ca.path("late.log")).unwrap_or_default()
    );
    wait_for("the proxy to exit", 30, || {
        graceful.child.0.try_wait().unwrap().is_some()
    });
    // Once its connection finished, not at the end of its grace.
    let log = graceful.log();
    assert!(
        !log.contains("still open after"),
        "the proxy waited out its grace period: {log}"
    );
}

/// A target on a Unix socket that reads the PROXY v2 header and answers
/// with the identity in it (meshca's TLV 0xE0) and the client's port.
const PROXY_V2_TARGET: &str = r#"
import os, socket, struct, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)
while True:
    c, _ = s.accept()
    head = b""
    while len(head) < 16: head += c.recv(16 - len(head))
    assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n", head
    n = struct.unpack(">H", head[14:16])[0]
    body = b""
    while len(body) < n: body += c.recv(n - len(body))
    sport = struct.unpack(">H", body[8:10])[0]
    # Read what the client sent first (a plaintext hello), so that closing
    # with it unread does not reset the connection.
    c.settimeout(0.3)
    try: c.recv(100)
    except OSError: pass
    rest = body[12:]; ident = "none"; ver = "none"
    while rest:
        t, l = rest[0], struct.unpack(">H", rest[1:3])[0]
        v = rest[3:3 + l]
        if t == 0xE0: ident = v.decode()
        if t == 0x20:
            sub = v[5:]
            while sub:
                st, sl = sub[0], struct.unpack(">H", sub[1:3])[0]
                if st == 0x21: ver = sub[3:3 + sl].decode()
                sub = sub[3 + sl:]
        rest = rest[3 + l:]
    c.sendall(f"identity={ident} version={ver} port={sport}\n".encode())
    c.close()
"#;

#[test]
fn unix_target_with_the_identity_in_a_proxy_v2_header() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let sock = ca.path("app.sock");
    let _target = spawn("python3", &["-c", PROXY_V2_TARGET, p(&sock)]);
    wait_for("the unix socket", 10, || sock.exists());
    let (_proxy, port) = Proxy::server(
        &ca,
        &format!("unix:{}", p(&sock)),
        &web,
        &["--proxy-protocol", "--permissive"],
    );
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
c = ctx.wrap_socket(raw, server_hostname="localhost")
print(c.getsockname()[1], c.recv(200).decode().strip())
"#;
    let out = tool_within(
        "python3",
        &[
            "-c",
            script,
            &port.to_string(),
            p(&web.join("ca.crt")),
            p(&cli.join("tls.crt")),
            p(&cli.join("tls.key")),
        ],
        Duration::from_secs(30),
    );
    let (client_port, answer) = out.trim().split_once(' ').unwrap();
    assert_eq!(
        answer,
        format!(
            "identity=spiffe://cluster.local/ns/default/sa/cli version=TLSv1.3 port={client_port}"
        )
    );
    // Permissive: a plaintext client passes, with no identity claimed for it.
    let out = tool_within(
        "python3",
        &[
            "-c",
            "import socket,sys; c=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10); c.sendall(b'hi'); print(c.recv(200).decode().strip())",
            &port.to_string(),
        ],
        Duration::from_secs(30),
    );
    assert!(out.starts_with("identity=none version=none"), "{out}");
}

/// HTTPS requests (a new connection each) in 4 threads until the stop file
/// (`argv[2]`) exists; after each, "OK FAILED" counts go to the progress
/// file (`argv[3]`, replaced as one). Prints "ok N failed M" and the first
/// failure. A socket that waits 10 s is a failure.
const LOAD_CLIENT: &str = r#"
import os, socket, ssl, sys, threading
port, stop, progress = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ok = [0]; bad = []; lock = threading.Lock()
def note():
    with open(progress + ".tmp", "w") as f: f.write(f"{ok[0]} {len(bad)}")
    os.replace(progress + ".tmp", progress)
def one():
    ctx = ssl.create_default_context(cafile=sys.argv[4]); ctx.load_cert_chain(sys.argv[5], sys.argv[6])
    while not os.path.exists(stop):
        try:
            c = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
            c.sendall(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while True:
                b = c.recv(65536)
                if not b: break
                data += b
            c.close()
            with lock:
                if data.startswith(b"HTTP/1.0 200") and b"hello through the proxy" in data: ok[0] += 1
                else: bad.append(repr(data[:80]))
                note()
        except Exception as e:
            with lock:
                bad.append(repr(e)); note()
ts = [threading.Thread(target=one) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print("ok", ok[0], "failed", len(bad), bad[:1])
"#;

/// The (succeeded, failed) counts a load client last wrote to `file`;
/// (0, 0) before its first.
pub(crate) fn progress_of(file: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut counts = text.split_whitespace().map(|n| n.parse().unwrap_or(0));
    (counts.next().unwrap_or(0), counts.next().unwrap_or(0))
}

fn serial_in(cert: &Path) -> String {
    tool("openssl", &["x509", "-in", p(cert), "-noout", "-serial"])
        .trim()
        .to_owned()
}

#[test]
fn certificate_rotation_under_a_thousand_requests_fails_none() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let first_serial = serial_in(&web.join("tls.crt"));
    let (_site, site_port) = http_site(&ca.path("site"));
    let (proxy, port) = Proxy::server(
        &ca,
        &format!("127.0.0.1:{site_port}"),
        &web,
        &["--allow", "spiffe://cluster.local/ns/default/sa/cli"],
    );
    // The serial of the certificate the proxy serves now, if it answers.
    let served = || -> Option<String> {
        let out = run_within(
            Command::new("sh").args([
                "-c",
                &format!(
                    "openssl s_client -connect 127.0.0.1:{port} -servername localhost -cert {} -key {} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
                    p(&cli.join("tls.crt")),
                    p(&cli.join("tls.key")),
                    p(&web.join("ca.crt"))
                ),
            ]),
            Duration::from_secs(30),
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let (stop, progress) = (ca.path("stop"), ca.path("progress"));
    let mut load = spawn_cmd(
        Command::new("python3")
            .args([
                "-c",
                LOAD_CLIENT,
                &port.to_string(),
                p(&stop),
                p(&progress),
                p(&web.join("ca.crt")),
                p(&cli.join("tls.crt")),
                p(&cli.join("tls.key")),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(ca.path("load.log")).unwrap()),
    );
    let calls = || progress_of(&progress);
    wait_for("the first requests through the proxy", 60, || {
        calls().0 >= 50
    });
    // Rotate the served certificate (and key) three times under the load,
    // the way the agent does: a new set replaces the files as one. The
    // next rotation waits until the proxy serves the new certificate and a
    // hundred requests went through with it.
    let mut last = first_serial.clone();
    for _ in 0..3 {
        ca.issue("web", "web", &["--dns", "localhost"]);
        last = serial_in(&web.join("tls.crt"));
        wait_for("the proxy to serve the new certificate", 30, || {
            served().as_deref() == Some(last.as_str())
        });
        let from = calls().0;
        wait_for("a hundred requests with the new certificate", 60, || {
            calls().0 >= from + 100
        });
    }
    assert_ne!(last, first_serial);
    wait_for("a thousand requests", 120, || calls().0 >= 1000);
    std::fs::write(&stop, "").unwrap();
    let (status, text) = output_of(&mut load, "the load client", Duration::from_secs(60));
    let ok: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        status.success() && text.contains(" failed 0 ") && ok >= 1000,
        "{text}{}",
        std::fs::read_to_string(ca.path("load.log")).unwrap_or_default()
    );
    // And the proxy still serves the last certificate.
    assert_eq!(served().as_deref(), Some(last.as_str()));
    drop(proxy);
}
