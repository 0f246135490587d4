//! The API port's connection cap and its reserve, and the redirect
//! listener's header and idle timeouts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;
use crate::common::*;
use crate::refusal::api_error;

/// Whether the server closes `s` (EOF or reset) within a second, `s`
/// having sent nothing: `false`, still open after it.
fn closed_at_once(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("a connection past the cap was sent {n} bytes"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => panic!("reading a connection past the cap: {e}"),
    }
}

/// Whether `s` is still open at the server's end (nothing came, no EOF).
fn still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

/// A connection to `port` from the loopback address `127.0.0.<source>`
/// (all of 127/8 is this machine's: several sources on one host).
fn connect_from(source: u8, port: u16) -> TcpStream {
    let from = std::net::SocketAddr::from(([127, 0, 0, source], 0));
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

#[test]
fn past_the_connection_reserve_only_the_admin_and_health_checks_are_served_and_at_the_cap_none() {
    const MAX: usize = 24;
    const RESERVED: usize = 8;
    let tmp = scratch();
    let d = data_dir(&tmp, "", "max_connections = 24\nreserved_connections = 8\n");
    let srv = Server::start(&d, &[]);
    let (web, _) = workload(&srv, tmp.path(), "default", "web", "web");
    let connect = || TcpStream::connect(("127.0.0.1", srv.port)).unwrap();

    // Connections that say nothing. The server closes one of the ordinary
    // share when its handshake time (10 s) is out: everything below is done
    // within 8 s of opening the first.
    let opened = Instant::now();
    let in_time = |what: &str| {
        assert!(
            opened.elapsed() < Duration::from_secs(8),
            "{what}: checked {:?} after the idle connections were opened, too late to rely on them (the server closes them after 10 s)",
            opened.elapsed()
        );
    };
    // 15 open: a new one makes 16, the whole ordinary share, and anyone is served.
    let mut idle: Vec<TcpStream> = (0..MAX - RESERVED - 1).map(|_| connect()).collect();
    let (code, body) = srv.curl("GET", "/v1/bundle", None, &[]);
    assert_eq!(
        code, 200,
        "anonymous, within max_connections - reserved_connections: {body}"
    );
    // 16 open: a new one is in the reserve, where anyone but the admin is
    // answered 503 naming limits.max_connections, with Retry-After (the
    // first call may come before the server has accepted all 16).
    idle.push(connect());
    let mut refused = None;
    eventually(
        "an anonymous call past max_connections - reserved_connections to be refused",
        Duration::from_secs(3),
        || {
            let a = call(&srv, "GET", "/v1/bundle", None, &[], 10);
            if a.code == 503 {
                refused = Some(a);
                return true;
            }
            assert_eq!(a.code, 200, "{}", a.body);
            false
        },
    );
    let refused = refused.unwrap();
    let message = api_error(
        &refused.pair(),
        503,
        "unavailable",
        "anonymous, past the reserve",
    );
    assert!(
        message.contains("limits.max_connections"),
        "the message does not name limits.max_connections: {message}"
    );
    retry_after(&refused, "anonymous, past the reserve");
    let a = call(
        &srv,
        "GET",
        "/v1/identities/default/web",
        None,
        &cert_args(&web),
        10,
    );
    let message = api_error(
        &a.pair(),
        503,
        "unavailable",
        "a workload, past the reserve",
    );
    assert!(message.contains("limits.max_connections"), "{message}");
    retry_after(&a, "a workload, past the reserve");
    // The health checks and the admin are served.
    for path in ["/healthz", "/readyz"] {
        let (code, body) = srv.curl("GET", path, None, &[]);
        assert_eq!(code, 200, "{path} past the reserve: {body}");
    }
    let (code, body) = srv.curl("GET", "/v1/ca", None, &srv.admin());
    assert_eq!(code, 200, "the admin past the reserve: {body}");
    in_time("the reserve");

    // One source holds at most half of the reserve: 127.0.0.2 gets 4 of
    // the 8 places, its fifth connection is closed at once, and the admin
    // (from 127.0.0.1) is still served. A reserved place that says nothing
    // is given back after 2 s: all this is done within that.
    let second = Instant::now();
    let mut from_two: Vec<TcpStream> = (0..RESERVED / 2)
        .map(|_| connect_from(2, srv.port))
        .collect();
    let mut fifth = connect_from(2, srv.port);
    assert!(
        closed_at_once(&mut fifth),
        "a source's connection past its half of the reserve was kept"
    );
    assert!(
        from_two.iter().all(still_open),
        "a connection within the source's half of the reserve was closed"
    );
    let (code, body) = srv.curl("GET", "/v1/ca", None, &srv.admin());
    assert_eq!(
        code, 200,
        "the admin, another source holding its half: {body}"
    );

    // At max_connections a new connection is closed at once, whoever asks:
    // 16 + 4 from 127.0.0.2 + 4 from 127.0.0.3 (less any the server has
    // not taken yet: the probe retries).
    from_two.extend((0..RESERVED / 2).map(|_| connect_from(3, srv.port)));
    let mut sources = 4u8;
    eventually(
        "a connection past max_connections to be closed at once",
        Duration::from_secs(1),
        || {
            let mut probe = connect_from(sources, srv.port);
            sources += 1;
            if closed_at_once(&mut probe) {
                return true;
            }
            from_two.push(probe);
            false
        },
    );
    let open = idle
        .iter()
        .chain(&from_two)
        .filter(|s| still_open(s))
        .count();
    assert!(
        (MAX - 1..=MAX).contains(&open),
        "a new connection was closed at once with {open} open"
    );
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "the cap was checked {:?} after the reserve was filled, past the 2 s a reserved place is held",
        second.elapsed()
    );
    in_time("the cap");
    // And a reserved place that says nothing is given back within 2 s.
    let mut held = from_two.swap_remove(0);
    let closed = closed_after(&mut held, second, Duration::from_secs(4));
    assert!(
        closed.is_some_and(|t| t >= Duration::from_secs(2)),
        "a silent connection in the reserve was closed after {closed:?}, not at 2 s"
    );

    drop(idle);
    drop(from_two);
    eventually(
        "anonymous calls served again once the connections are closed",
        Duration::from_secs(10),
        || srv.curl("GET", "/v1/bundle", None, &[]).0 == 200,
    );
}

/// The head of an HTTP/1.1 answer read from `s`.
fn read_head(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before the answer's head: {}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn the_redirect_listener_cuts_off_unfinished_and_idle_connections() {
    let tmp = scratch();
    let d = tmp.path().join("data");
    // The redirect port is chosen afresh with every attempt to start.
    let mut redirect = 0;
    let srv = Server::start_cmd(&d, |port| {
        redirect = free_port();
        let mut cmd = meshca();
        cmd.args(["serve", "--dir", d.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-redirect", &format!("127.0.0.1:{redirect}")]);
        cmd
    });
    wait_for_port(redirect);
    let connect = || TcpStream::connect(("127.0.0.1", redirect)).unwrap();
    // Each timed from before it connects: the server's clock for it starts
    // later, so no close is seen earlier than the server's 10 s.
    let limit = Duration::from_secs(20);
    let (unfinished, idle, kept_alive) = std::thread::scope(|s| {
        let unfinished = s.spawn(|| {
            let opened = Instant::now();
            let mut c = connect();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
            closed_after(&mut c, opened, limit)
        });
        let idle = s.spawn(|| {
            let opened = Instant::now();
            let mut c = connect();
            closed_after(&mut c, opened, limit)
        });
        let kept_alive = s.spawn(|| {
            let opened = Instant::now();
            let mut c = connect();
            c.write_all(b"GET /v1/ca HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let head = read_head(&mut c);
            assert!(head.starts_with("HTTP/1.1 301"), "{head}");
            closed_after(&mut c, opened, limit)
        });
        // Meanwhile a whole request is answered as ever.
        assert_redirects(&srv, redirect);
        (
            unfinished.join().unwrap(),
            idle.join().unwrap(),
            kept_alive.join().unwrap(),
        )
    });
    for (what, closed) in [
        ("a request whose headers never end", unfinished),
        ("a connection that sends nothing", idle),
        ("a connection kept alive after its answer", kept_alive),
    ] {
        let after = closed.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(
            (Duration::from_secs(10)..=Duration::from_secs(16)).contains(&after),
            "{what}: closed after {after:?}, expected 10 to 16 s"
        );
    }
    let out = tool(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://localhost:{redirect}/"),
        ],
    );
    assert_eq!(out, "301", "the redirect listener after the slow clients");
}
