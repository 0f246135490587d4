//! Trust-model attacks (issue 19): trust_proxy. `meshca proxy` (and
//! meshca-tls under it) against allow rules that read as more than they
//! admit, permissive mode with an allow-list, a PROXY v2 header that claims
//! a certificate nobody presented, and private keys others can read.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::proxy::{Proxy, http_site, strings};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs meshca with `args`, which must refuse to start: it exits (within
/// 10 s; a proxy that started is killed and the test fails) with an error,
/// not a panic, whose stderr holds every one of `needles`. Nothing listens
/// on `port` afterwards.
fn refused_at_start(args: &[&str], port: u16, needles: &[&str]) -> String {
    // Guarded: a proxy that started instead is ended with the test.
    let mut child = spawn_cmd(
        meshca()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.end();
            panic!("meshca {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    keep_output("cli-stderr", stderr.as_bytes());
    assert!(!status.success(), "meshca {args:?} succeeded: {stderr}");
    assert_ne!(
        status.code(),
        Some(101),
        "meshca {args:?} panicked: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "meshca {args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on {port} after a refused start"
    );
    stderr
}

/// An HTTPS request through the proxy with Python's `ssl` (OpenSSL):
/// prints `ok <status line>`, or `refused <OpenSSL reason>` for a TLS
/// alert, or `broken <error>`. The request may fail to go out (the proxy
/// closed after its alert): the alert is read all the same.
const HTTPS_CLIENT: &str = r#"
import os, socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
host = os.environ.get("SNI", "localhost")
ctx = ssl.create_default_context(cafile=ca)
if len(sys.argv) > 4:
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
try:
    c = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=host)
except ssl.SSLError as e:
    print("refused", e.reason); sys.exit(0)
try:
    c.sendall(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
except OSError:
    pass
try:
    data = b""
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
    print("ok", data.decode(errors="replace").splitlines()[0] if data else "(nothing)")
except ssl.SSLError as e:
    print("refused", e.reason)
except OSError as e:
    print("broken", e)
"#;

/// `HTTPS_CLIENT` against `port`, trusting `ca_dir`'s bundle, presenting
/// the certificate in `creds`.
fn https(port: u16, ca_dir: &Path, creds: &Path) -> String {
    let port = port.to_string();
    let ca = ca_dir.join("ca.crt");
    let (crt, key) = (creds.join("tls.crt"), creds.join("tls.key"));
    tool(
        "python3",
        &["-c", HTTPS_CLIENT, &port, p(&ca), p(&crt), p(&key)],
    )
    .trim()
    .to_owned()
}

/// `https` to a server whose certificate names `host` rather than localhost.
fn https_to(host: &str, port: u16, ca_dir: &Path, creds: &Path) -> String {
    let ca = ca_dir.join("ca.crt");
    let (crt, key) = (creds.join("tls.crt"), creds.join("tls.key"));
    let out = std::process::Command::new("python3")
        .env("SNI", host)
        .args([
            "-c",
            HTTPS_CLIENT,
            &port.to_string(),
            p(&ca),
            p(&crt),
            p(&key),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn allow_rules_that_read_as_prefixes_are_refused_at_start() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cart = ca.issue("cart", "cart", &["-n", "shop"]);
    let shopping = ca.issue("cart", "shopping", &["-n", "shopping"]);
    let (_site, site_port) = http_site(&ca.path("site"));
    let target = format!("127.0.0.1:{site_port}");
    // Where the proxies that must refuse to start would listen.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server_on = |listen: &str, allow: &str| {
        vec![
            "proxy".to_owned(),
            "server".into(),
            "--listen".into(),
            listen.to_owned(),
            "--target".into(),
            target.clone(),
            "--certs".into(),
            p(&web).into(),
            "--allow".into(),
            allow.into(),
        ]
    };
    let server = |allow: &str| server_on(&listen, allow);
    // Each of these used to start, as a raw string prefix (the first also
    // let in ns/shopping, the second api.other.svc).
    for (rule, why) in [
        (
            "spiffe://cluster.local/ns/shop*",
            "'*' may only end a SPIFFE ID as a whole path segment, /*",
        ),
        (
            "api*",
            "DNS names are matched exactly, with no wildcard or prefix",
        ),
        (
            "*.shop.svc",
            "DNS names are matched exactly, with no wildcard or prefix",
        ),
        (
            "spiffe://cluster.local/ns/shop/../bank/*",
            "path segment \"..\" is not allowed",
        ),
    ] {
        let args = server(rule);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_at_start(
            &args,
            port,
            &[
                &format!("--allow {rule:?}"),
                &format!("invalid allow rule {rule:?}"),
                why,
                "spiffe://cluster.local/ns/shop/*",
            ],
        );
    }
    // The same rule in a file is refused naming the file.
    let config = ca.path("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[[route]]\nname = \"api\"\nside = \"server\"\nlisten = \"{listen}\"\n\
             target = \"{target}\"\ncerts = \"{}\"\nallow = [\"spiffe://cluster.local/ns/shop*\"]\n",
            p(&web)
        ),
    )
    .unwrap();
    refused_at_start(
        &["proxy", "run", "--config", p(&config)],
        port,
        &[
            p(&config),
            "invalid allow rule \"spiffe://cluster.local/ns/shop*\"",
        ],
    );
    // A client route's server_id follows the same rules.
    let cport = free_port();
    refused_at_start(
        &[
            "proxy",
            "client",
            "--listen",
            &format!("127.0.0.1:{cport}"),
            "--target",
            &listen,
            "--certs",
            p(&cart),
            "--server-id",
            "spiffe://cluster.local/ns/default/sa/web*",
        ],
        cport,
        &[
            "server_id",
            "invalid server identity \"spiffe://cluster.local/ns/default/sa/web*\"",
        ],
    );

    // The rule as it must be written: shop's workloads get in, ns/shopping's
    // are refused with a TLS alert, and the proxy keeps serving.
    // (On a port of its own: another process may have taken the one above
    // meanwhile.)
    let (proxy, ports) = Proxy::start_on(1, ca.path("proxy.log"), |ports| {
        server_on(
            &format!("127.0.0.1:{}", ports[0]),
            "spiffe://cluster.local/ns/shop/*",
        )
        .split_off(1)
    });
    let port = ports[0];
    assert_eq!(https(port, &web, &cart), "ok HTTP/1.0 200 OK");
    assert_eq!(
        https(port, &web, &shopping),
        "refused TLSV1_ALERT_ACCESS_DENIED"
    );
    assert_eq!(https(port, &web, &cart), "ok HTTP/1.0 200 OK");
    let log = proxy.log();
    assert!(
        log.contains("not_allowed") && log.contains("spiffe://cluster.local/ns/shopping/sa/cart"),
        "{log}"
    );
}

#[test]
fn permissive_mode_with_an_allow_list_is_refused_at_start() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let why = "permissive lets clients without a certificate, and plaintext clients, \
               reach the target, so the allow-list would refuse only certificates outside it; \
               drop permissive to enforce the list (mtls), or drop allow while migrating";
    refused_at_start(
        &[
            "proxy",
            "server",
            "--listen",
            &listen,
            "--target",
            "127.0.0.1:9",
            "--certs",
            p(&web),
            "--permissive",
            "--allow",
            "spiffe://cluster.local/ns/default/*",
        ],
        port,
        &[
            "route server: permissive (--permissive) and allow (--allow) do not go together",
            why,
        ],
    );
    let config = ca.path("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[[route]]\nname = \"api\"\nside = \"server\"\nlisten = \"{listen}\"\n\
             target = \"127.0.0.1:9\"\ncerts = \"{}\"\npermissive = true\n\
             allow = [\"spiffe://cluster.local/ns/default/sa/cli\"]\n",
            p(&web)
        ),
    )
    .unwrap();
    refused_at_start(
        &["proxy", "run", "--config", p(&config)],
        port,
        &[
            "route api: permissive (--permissive) and allow (--allow)",
            why,
        ],
    );
}

/// A target on a Unix socket that reads the PROXY v2 header and answers
/// with what its `PP2_TYPE_SSL` TLV says (client bits, verify field, the
/// version sub-TLV, any other sub-TLV) and meshca's identity TLV 0xE0.
const HEADER_TARGET: &str = r#"
import socket, struct, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)
def read(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x: raise EOFError("closed")
        b += x
    return b
while True:
    c, _ = s.accept()
    try:
        head = read(c, 16)
        assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n", head
        assert head[13] == 0x11, head
        body = read(c, struct.unpack(">H", head[14:16])[0])
    except Exception:
        c.close(); continue
    # Take in what a plaintext client sent, so closing does not reset.
    c.settimeout(0.3)
    try: c.recv(100)
    except OSError: pass
    rest = body[12:]; client = verify = ver = ident = "none"; other = []
    while rest:
        t, l = rest[0], struct.unpack(">H", rest[1:3])[0]
        v = rest[3:3 + l]
        if t == 0xE0:
            ident = v.decode()
        elif t == 0x20:
            client = v[0]; verify = struct.unpack(">I", v[1:5])[0]
            sub = v[5:]
            while sub:
                st, sl = sub[0], struct.unpack(">H", sub[1:3])[0]
                if st == 0x21: ver = sub[3:3 + sl].decode()
                else: other.append(hex(st))
                sub = sub[3 + sl:]
        else:
            other.append(hex(t))
        rest = rest[3 + l:]
    c.sendall(f"client={client} verify={verify} version={ver} identity={ident} other={','.join(other) or 'none'}\n".encode())
    c.close()
"#;

/// Connects to the proxy as `mode` (`cert`: TLS with a client certificate,
/// `nocert`: TLS without one, `plain`: plaintext) and prints the target's
/// answer.
const HEADER_CLIENT: &str = r#"
import socket, ssl, sys
port, mode = int(sys.argv[1]), sys.argv[2]
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
if mode == "plain":
    raw.sendall(b"hi"); c = raw
else:
    ctx = ssl.create_default_context(cafile=sys.argv[3])
    if mode == "cert": ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    c = ctx.wrap_socket(raw, server_hostname="localhost")
print(c.recv(300).decode().strip())
"#;

#[test]
fn the_proxy_v2_header_claims_a_certificate_only_when_one_was_verified() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let sock = ca.path("app.sock");
    let _target = spawn("python3", &["-c", HEADER_TARGET, p(&sock)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the target's socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_proxy, port) = Proxy::server(
        &ca,
        &format!("unix:{}", p(&sock)),
        &web,
        &["--proxy-protocol", "--permissive"],
    );
    let port = port.to_string();
    let ca_crt = web.join("ca.crt");
    let (crt, key) = (cli.join("tls.crt"), cli.join("tls.key"));
    let ask = |mode: &str| {
        tool(
            "python3",
            &[
                "-c",
                HEADER_CLIENT,
                &port,
                mode,
                p(&ca_crt),
                p(&crt),
                p(&key),
            ],
        )
        .trim()
        .to_owned()
    };
    // PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS, verified,
    // and the certificate's SPIFFE ID.
    assert_eq!(
        ask("cert"),
        "client=7 verify=0 version=TLSv1.3 identity=spiffe://cluster.local/ns/default/sa/cli other=none"
    );
    // TLS without a client certificate: PP2_CLIENT_SSL alone, verify not 0,
    // no identity (this said 7 and 0: a certificate presented and verified).
    assert_eq!(
        ask("nocert"),
        "client=1 verify=1 version=TLSv1.3 identity=none other=none"
    );
    // Plaintext: no SSL TLV at all.
    assert_eq!(
        ask("plain"),
        "client=none verify=none version=none identity=none other=none"
    );
}

/// The serial of the certificate the proxy on `port` serves.
fn served_serial(port: u16, client: &Path, ca_dir: &Path) -> String {
    tool(
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect 127.0.0.1:{port} -servername localhost -cert {} -key {} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
                p(&client.join("tls.crt")),
                p(&client.join("tls.key")),
                p(&ca_dir.join("ca.crt"))
            ),
        ],
    )
}

fn file_serial(cert: &Path) -> String {
    tool("openssl", &["x509", "-in", p(cert), "-noout", "-serial"])
}

#[test]
fn a_private_key_others_can_read_is_refused_at_start_and_on_reload() {
    let ca = Ca::new(&[]);
    let web = ca.issue("web", "web", &["--dns", "localhost"]);
    let cli = ca.issue("cli", "cli", &[]);
    let (_site, site_port) = http_site(&ca.path("site"));
    let target = format!("127.0.0.1:{site_port}");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server_args = [
        "server",
        "--listen",
        listen.as_str(),
        "--target",
        target.as_str(),
        "--certs",
        p(&web),
    ];

    // At start: refused, naming the file, its mode and the fix.
    let key = web.join("tls.key");
    chmod(&key, 0o644);
    let mut args = vec!["proxy"];
    args.extend_from_slice(&server_args);
    refused_at_start(
        &args,
        port,
        &[
            &format!(
                "route server: {} holds a private key that group or others can read (mode 0644)",
                p(&key)
            ),
            &format!("`chmod 600 {}`", p(&key)),
        ],
    );
    // A client route reads its key the same way; group-readable is refused too.
    let cli_key = cli.join("tls.key");
    chmod(&cli_key, 0o640);
    let cport = free_port();
    refused_at_start(
        &[
            "proxy",
            "client",
            "--listen",
            &format!("127.0.0.1:{cport}"),
            "--target",
            &listen,
            "--certs",
            p(&cli),
            "--server-id",
            "spiffe://cluster.local/ns/default/sa/web",
        ],
        cport,
        &[
            &format!("route client: {} holds a private key", p(&cli_key)),
            "(mode 0640)",
            &format!("`chmod 600 {}`", p(&cli_key)),
        ],
    );
    chmod(&key, 0o600);
    chmod(&cli_key, 0o600);

    // On reload: a new set whose key others can read is not taken; the old
    // one keeps serving, the refusal is logged, and the set is taken once
    // the key is private. (On a port of its own: another process may have
    // taken the one above meanwhile.)
    let (proxy, ports) = Proxy::start_on(1, ca.path("reload.log"), |ports| {
        let mut args = strings(&server_args);
        args[2] = format!("127.0.0.1:{}", ports[0]);
        args
    });
    let port = ports[0];
    let first = file_serial(&web.join("tls.crt"));
    assert_eq!(served_serial(port, &cli, &web), first);
    let next_dir = ca.issue("web", "web-next", &["--dns", "localhost"]);
    let next = file_serial(&next_dir.join("tls.crt"));
    assert_ne!(next, first);
    // Copied in the way `cp` under umask 022 leaves files: 0644.
    for name in ["tls.key", "tls.crt"] {
        let tmp = web.join(format!(".{name}.new"));
        std::fs::copy(next_dir.join(name), &tmp).unwrap();
        chmod(&tmp, 0o644);
        std::fs::rename(&tmp, web.join(name)).unwrap();
    }
    // The reload that saw the new set has refused it (it says so once),
    // and the old set is still the one served.
    let refusal = format!("{} holds a private key", p(&key));
    eventually(
        "the proxy to refuse the new set",
        Duration::from_secs(20),
        || {
            let log = proxy.log();
            log.contains("refusing the TLS credentials on disk") && log.contains(&refusal)
        },
    );
    assert_eq!(served_serial(port, &cli, &web), first);
    assert_eq!(https(port, &web, &cli), "ok HTTP/1.0 200 OK");
    let log = proxy.log();
    assert!(
        log.contains("refusing the TLS credentials on disk, keeping the last good set")
            && log.contains(&format!("{} holds a private key", p(&key)))
            && log.contains("(mode 0644)")
            && log.contains(&format!("`chmod 600 {}`", p(&key))),
        "{log}"
    );
    chmod(&key, 0o600);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_serial(port, &cli, &web) != next {
        assert!(
            Instant::now() < deadline,
            "the set was not taken once its key was private: {}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(https(port, &web, &cli), "ok HTTP/1.0 200 OK");
}

/// Property 10: revocation reaches the data plane. The agent keeps `ca.crl`
/// (every issuing CA's CRL) next to `ca.crt`; the proxy checks client
/// certificates against it and reloads it. A client certificate revoked
/// for key compromise is refused by the proxy within 30 s, with the TLS
/// alert that says so; another client still gets through. With
/// `--revocation fail-closed`, a client whose issuer has no CRL in the
/// directory is refused.
#[test]
fn a_revoked_client_certificate_is_refused_by_the_proxy() {
    let tmp = scratch();
    let data = tmp.path().join("ca");
    let srv = Server::start(&data, &[]);
    let v: serde_json::Value =
        serde_json::from_str(&srv.cli_ok(&["token", "create", "web", "--json"])).unwrap();
    let web = tmp.path().join("web");
    let _agent = spawn_cmd(
        meshca()
            .args([
                "agent",
                "web",
                "--server",
                &srv.url(),
                "--token",
                v["token"].as_str().unwrap(),
                "--ca-fingerprint",
                v["ca_fingerprint"].as_str().unwrap(),
                "--out",
                p(&web),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(kept_log("agent.log")),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(web.join("tls.key").exists() && web.join("ca.crl").exists()) {
        assert!(
            Instant::now() < deadline,
            "the agent wrote no tls.key and ca.crl"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_site, site_port) = http_site(&tmp.path().join("site"));
    let target = format!("127.0.0.1:{site_port}");
    let (_proxy, ports) = Proxy::start_on(1, tmp.path().join("proxy.log"), |ports| {
        strings(&[
            "server",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &target,
            "--certs",
            p(&web),
        ])
    });
    let port = ports[0];
    let bad = tmp.path().join("bad");
    let good = tmp.path().join("good");
    srv.cli_ok(&["issue", "bad", "--profile", "client", "--out", p(&bad)]);
    srv.cli_ok(&["issue", "good", "--profile", "client", "--out", p(&good)]);
    let before = https_to("web.default.svc", port, &web, &bad);
    assert!(
        before.starts_with("ok HTTP/1.0 200"),
        "before the revocation: {before}"
    );
    let serial = tool(
        "openssl",
        &["x509", "-noout", "-serial", "-in", p(&bad.join("tls.crt"))],
    );
    let serial = serial.trim().trim_start_matches("serial=").to_lowercase();
    srv.cli_ok(&["revoke", &serial, "--reason", "keyCompromise"]);
    let revoked_at = Instant::now();
    // One deadline: the documented 30 s (the agent fetches the CRLs every
    // 20 s, the proxy reloads them within a second or two), and slack for a
    // loaded machine. How long it took is printed, not asserted.
    let deadline = revoked_at + Duration::from_secs(30 + 15);
    let answer = loop {
        let a = https_to("web.default.svc", port, &web, &bad);
        if !a.starts_with("ok") || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = revoked_at.elapsed();
    assert_eq!(
        answer, "refused SSLV3_ALERT_CERTIFICATE_REVOKED",
        "after {took:?}"
    );
    println!("the proxy refused the revoked client certificate {took:?} after the revocation");
    assert!(
        https_to("web.default.svc", port, &web, &good).starts_with("ok HTTP/1.0 200"),
        "another client"
    );

    // Fail closed: a directory without ca.crl (a certificate set the
    // agent does not keep) cannot check revocation, and refuses.
    let strict_dir = tmp.path().join("strict");
    std::fs::create_dir_all(&strict_dir).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::copy(web.join(f), strict_dir.join(f)).unwrap();
    }
    chmod(&strict_dir.join("tls.key"), 0o600);
    let (_strict, sports) = Proxy::start_on(1, tmp.path().join("strict.log"), |ports| {
        strings(&[
            "server",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--target",
            &target,
            "--certs",
            p(&strict_dir),
            "--revocation",
            "fail-closed",
        ])
    });
    let sport = sports[0];
    let answer = https_to("web.default.svc", sport, &web, &good);
    assert!(answer.starts_with("refused"), "{answer}");
    // With the CRLs in place, the same client gets through.
    std::fs::copy(web.join("ca.crl"), strict_dir.join("ca.crl")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = https_to("web.default.svc", sport, &web, &good);
        if a.starts_with("ok HTTP/1.0 200") {
            break;
        }
        assert!(Instant::now() < deadline, "fail-closed with CRLs: {a}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
