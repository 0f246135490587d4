//! `meshca proxy` with real peers: Python's `http.server` and small Python
//! TCP programs as targets, curl and Python's `ssl` as clients, openssl for
//! a foreign CA.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A running `meshca proxy`, killed when dropped.
pub(crate) struct Proxy {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Proxy {
    pub(crate) fn start(args: &[&str], log: PathBuf, wait: &[u16]) -> Proxy {
        let child = meshca()
            .arg("proxy")
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        for p in wait {
            wait_for_port(*p);
        }
        Proxy {
            child: Some(child),
            log,
        }
    }

    /// `meshca proxy server` on a free loopback port in front of `target`,
    /// serving `certs`, with `extra` flags; logs to `ca`'s `proxy.log`.
    /// Returns once the port listens.
    pub(crate) fn server(ca: &Ca, target: &str, certs: &Path, extra: &[&str]) -> (Proxy, u16) {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "server",
            "--listen",
            &listen,
            "--target",
            target,
            "--certs",
            p(certs),
        ];
        args.extend_from_slice(extra);
        (Proxy::start(&args, ca.path("proxy.log"), &[port]), port)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Python's web server serving `dir/index.html` ("hello through the
/// proxy"), with a listen backlog of 4096 rather than 5: the proxy opens a
/// target connection per client, a thousand at once in the hostile tests.
pub(crate) fn http_site(dir: &Path) -> (Child, u16) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("index.html"), "hello through the proxy\n").unwrap();
    let port = free_port();
    let server_py = "import functools, sys, http.server as h\n\
        class S(h.ThreadingHTTPServer):\n    request_queue_size = 4096\n\
        handler = functools.partial(h.SimpleHTTPRequestHandler, directory=sys.argv[2])\n\
        S(('127.0.0.1', int(sys.argv[1])), handler).serve_forever()\n";
    let child = spawn("python3", &["-c", server_py, &port.to_string(), p(dir)]);
    wait_for_port(port);
    (child, port)
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
    let health = free_port();
    let (proxy, port) = Proxy::server(
        &ca,
        &format!("127.0.0.1:{site_port}"),
        &web,
        &[
            "--allow",
            "spiffe://cluster.local/ns/default/*",
            "--health",
            &format!("127.0.0.1:{health}"),
        ],
    );
    wait_for_port(health);
    let url = format!("https://localhost:{port}/index.html");
    let as_ = |dir: &Path| {
        let mut args = creds(dir);
        args[1] = p(&web.join("ca.crt")).into();
        curl(&url, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (ok, body) = as_(&cli);
    assert!(ok && body.contains("hello through the proxy"), "{body}");
    // (HTTP/2 is not offered in ALPN, or curl would speak it to an HTTP/1 target.)
    let (ok, body) = curl(&url, &["--cacert", p(&web.join("ca.crt"))]);
    assert!(!ok, "no client certificate must be refused: {body}");
    let (ok, body) = as_(&bank);
    assert!(!ok, "a peer outside the allow-list must be refused: {body}");
    let (ok, body) = as_(&stranger);
    assert!(!ok, "a certificate of another CA must be refused: {body}");
    let mut tls12 = creds(&cli);
    tls12[1] = p(&web.join("ca.crt")).into();
    tls12.extend(["--tls-max".into(), "1.2".into()]);
    let (ok, body) = curl(&url, &tls12.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "TLS 1.2 must be refused by default: {body}");

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
    // Only AEAD suites: a client that offers nothing but CBC is refused.
    let (ok, out) = with(&[
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        "--ciphers",
        "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA",
    ]);
    assert!(!ok, "CBC suites must be refused: {out}");
}

#[test]
fn client_route_to_server_route_end_to_end() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let (_site, site_port) = http_site(&ca.path("site"));
    let (sport, cport, wrong_port, health) = (free_port(), free_port(), free_port(), free_port());
    let config = ca.path("proxy.toml");
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
    let _proxy = Proxy::start(
        &["run", "--config", p(&config)],
        ca.path("proxy.log"),
        &[sport, cport, wrong_port, health],
    );
    let (ok, body) = curl(&format!("http://127.0.0.1:{cport}/index.html"), &[]);
    assert!(ok && body.contains("hello through the proxy"), "{body}");
    let (ok, body) = curl(&format!("http://127.0.0.1:{wrong_port}/index.html"), &[]);
    assert!(
        !ok,
        "a server with another identity must be refused: {body}"
    );
    let m = metrics(health);
    assert!(
        m.contains(r#"route="wrong",reason="bad_certificate"}"#),
        "{m}"
    );
    assert!(m.contains(r#"route="front",outcome="proxied"}"#), "{m}");
    assert!(
        m.contains(r#"route="out",peer="spiffe://cluster.local/ns/default/sa/web"}"#),
        "{m}"
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
/// the hash of what it sent.
const HASH_CLIENT: &str = r#"
import hashlib, socket, sys
host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
h = hashlib.sha256(); c = socket.create_connection((host, port))
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
    let target_port = free_port();
    let _target = spawn("python3", &["-c", HASH_TARGET, &target_port.to_string()]);
    wait_for_port(target_port);
    let (sport, cport) = (free_port(), free_port());
    let _server = Proxy::start(
        &[
            "server",
            "--listen",
            &format!("127.0.0.1:{sport}"),
            "--target",
            &format!("127.0.0.1:{target_port}"),
            "--certs",
            p(&web),
        ],
        ca.path("server.log"),
        &[sport],
    );
    let _client = Proxy::start(
        &[
            "client",
            "--listen",
            &format!("127.0.0.1:{cport}"),
            "--target",
            &format!("localhost:{sport}"),
            "--certs",
            p(&cli),
            "--server-id",
            "web.default.svc",
        ],
        ca.path("client.log"),
        &[cport],
    );
    let out = tool(
        "python3",
        &["-c", HASH_CLIENT, "127.0.0.1", &cport.to_string(), "1024"],
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
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
held = []
while True:
    c, _ = s.accept(); held.append(c)
"#;

/// Writes for 1.5 s without blocking forever; prints how much got out.
/// (A connection reset before anything got out is tried again once: the
/// proxies have just started.)
const PUSH_CLIENT: &str = r#"
import socket, sys, time
for attempt in range(3):
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    c.settimeout(0.5)
    n = 0; end = time.time() + 1.5; block = b"x" * 65536
    try:
        while time.time() < end:
            try:
                n += c.send(block)
            except socket.timeout:
                pass
        break
    except ConnectionResetError:
        print(f"reset after {n} bytes, attempt {attempt}", file=sys.stderr)
        time.sleep(0.5)
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
    let stuck = free_port();
    let _stuck = spawn("python3", &["-c", STUCK_TARGET, &stuck.to_string()]);
    wait_for_port(stuck);
    let (sport, cport) = (free_port(), free_port());
    let server = Proxy::start(
        &[
            "server",
            "--listen",
            &format!("127.0.0.1:{sport}"),
            "--target",
            &format!("127.0.0.1:{stuck}"),
            "--certs",
            p(&web),
            "--idle-timeout",
            "2s",
            "--shutdown-grace",
            "5s",
        ],
        ca.path("server.log"),
        &[sport],
    );
    let client = Proxy::start(
        &[
            "client",
            "--listen",
            &format!("127.0.0.1:{cport}"),
            "--target",
            &format!("localhost:{sport}"),
            "--certs",
            p(&cli),
            "--server-id",
            "spiffe://cluster.local/ns/default/sa/web",
        ],
        ca.path("client.log"),
        &[cport],
    );
    let before = rss_kib(server.pid()) + rss_kib(client.pid());
    let pushed: u64 = tool("python3", &["-c", PUSH_CLIENT, &cport.to_string()])
        .trim()
        .parse()
        .unwrap();
    let after = rss_kib(server.pid()) + rss_kib(client.pid());
    assert!(
        pushed < 64 << 20,
        "the proxies took {pushed} bytes for a target that reads nothing"
    );
    assert!(
        after < before + 32 * 1024,
        "the proxies grew from {before} KiB to {after} KiB"
    );

    // Idle: a connection with no traffic is closed after --idle-timeout.
    let t = Instant::now();
    let out = tool(
        "python3",
        &[
            "-c",
            "import socket,sys; c=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); c.settimeout(20); print(len(c.recv(10)))",
            &cport.to_string(),
        ],
    );
    assert_eq!(out.trim(), "0", "the idle connection must be closed");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        t.elapsed()
    );

    // SIGTERM: new connections are refused at once, an open one may finish
    // within the grace period, then the process exits.
    let (_site, site_port) = http_site(&ca.path("site"));
    let gport = free_port();
    let mut graceful = Proxy::start(
        &[
            "server",
            "--listen",
            &format!("127.0.0.1:{gport}"),
            "--target",
            &format!("127.0.0.1:{site_port}"),
            "--certs",
            p(&web),
            "--shutdown-grace",
            "10s",
        ],
        ca.path("graceful.log"),
        &[gport],
    );
    // An open TLS connection that sends its request after the SIGTERM.
    let script = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2]); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
c = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="localhost")
print("connected", flush=True)
time.sleep(2)
c.sendall(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
data = b""
while True:
    b = c.recv(65536)
    if not b: break
    data += b
print(data.decode().splitlines()[0])
"#;
    let late = Command::new("python3")
        .args([
            "-c",
            script,
            &gport.to_string(),
            p(&web.join("ca.crt")),
            p(&cli.join("tls.crt")),
            p(&cli.join("tls.key")),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    Command::new("kill")
        .args(["-TERM", &graceful.pid().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", gport)).is_err(),
        "the listener must close on SIGTERM"
    );
    let out = late.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("HTTP/1.0 200"),
        "the open connection must finish: {text}"
    );
    let mut child = graceful.child.take().unwrap();
    wait_for("the proxy to exit once its connection finished", 5, || {
        child.try_wait().unwrap().is_some()
    });
    assert!(
        graceful
            .log()
            .contains("letting 1 open connection(s) finish"),
        "{}",
        graceful.log()
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
raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c = ctx.wrap_socket(raw, server_hostname="localhost")
print(c.getsockname()[1], c.recv(200).decode().strip())
"#;
    let out = tool(
        "python3",
        &[
            "-c",
            script,
            &port.to_string(),
            p(&web.join("ca.crt")),
            p(&cli.join("tls.crt")),
            p(&cli.join("tls.key")),
        ],
    );
    let (client_port, answer) = out.trim().split_once(' ').unwrap();
    assert_eq!(
        answer,
        format!(
            "identity=spiffe://cluster.local/ns/default/sa/cli version=TLSv1.3 port={client_port}"
        )
    );
    // Permissive: a plaintext client passes, with no identity claimed for it.
    let out = tool(
        "python3",
        &[
            "-c",
            "import socket,sys; c=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); c.sendall(b'hi'); print(c.recv(200).decode().strip())",
            &port.to_string(),
        ],
    );
    assert!(out.starts_with("identity=none version=none"), "{out}");
}

/// Many HTTPS requests (a new connection each) in 4 threads; prints
/// "ok N failed M" and the first failure.
const LOAD_CLIENT: &str = r#"
import socket, ssl, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
ok = [0]; bad = []; lock = threading.Lock()
def one():
    ctx = ssl.create_default_context(cafile=sys.argv[3]); ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    for _ in range(n // 4):
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
        except Exception as e:
            with lock: bad.append(repr(e))
ts = [threading.Thread(target=one) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print("ok", ok[0], "failed", len(bad), bad[:1])
"#;

#[test]
fn certificate_rotation_under_a_thousand_requests_fails_none() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let first_serial = tool(
        "openssl",
        &["x509", "-in", p(&web.join("tls.crt")), "-noout", "-serial"],
    );
    let (_site, site_port) = http_site(&ca.path("site"));
    let (proxy, port) = Proxy::server(
        &ca,
        &format!("127.0.0.1:{site_port}"),
        &web,
        &["--allow", "spiffe://cluster.local/ns/default/sa/cli"],
    );
    let load = Command::new("python3")
        .args([
            "-c",
            LOAD_CLIENT,
            &port.to_string(),
            "1000",
            p(&web.join("ca.crt")),
            p(&cli.join("tls.crt")),
            p(&cli.join("tls.key")),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Rotate the served certificate (and key) three times under the load,
    // the way the agent does: a new set replaces the files atomically.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        ca.issue("web", "web", &["--dns", "localhost"]);
    }
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("ok 1000 failed 0"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the proxy now serves the last certificate.
    let served = || {
        tool(
            "sh",
            &[
                "-c",
                &format!(
                    "openssl s_client -connect 127.0.0.1:{port} -servername localhost -cert {} -key {} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
                    p(&cli.join("tls.crt")),
                    p(&cli.join("tls.key")),
                    p(&web.join("ca.crt"))
                ),
            ],
        )
    };
    let last = tool(
        "openssl",
        &["x509", "-in", p(&web.join("tls.crt")), "-noout", "-serial"],
    );
    assert_ne!(last, first_serial);
    wait_for("the proxy to serve the newest certificate", 10, || {
        served() == last
    });
    drop(proxy);
}
