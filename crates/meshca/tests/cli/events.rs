//! The event stream when a client has missed events: it resumes from an id
//! older than a ring it can see still keeps, or it fell behind the live
//! broadcast. Either way it is told so with a `reset` event (reason `ring`
//! or `lagged`, crates/meshca-server/src/events.rs), so that it fetches the
//! bundle and its certificate again instead of going on as if nothing had
//! been missed; and the stream goes on.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use crate::common::*;

/// One server-sent event as a client reads it.
#[derive(Debug, Clone)]
pub(crate) struct Sse {
    pub(crate) id: u64,
    pub(crate) kind: String,
    pub(crate) data: Value,
}

/// What a client reads from the stream: an event, or anything else (a
/// field other than `id`, `event` and `data`, an event missing one of
/// them, data that is not JSON), kept as text. Comment lines (the
/// keep-alive `:`) are skipped.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Event(Sse),
    Other(String),
}

/// A server-sent-events parser fed with the bytes of the stream.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    id: Option<String>,
    kind: Option<String>,
    data: Option<String>,
}

impl SseParser {
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
            if line.is_empty() {
                out.extend(self.dispatch());
            } else if line.starts_with(':') {
                // A comment: the keep-alive.
            } else {
                match line.split_once(": ") {
                    Some(("id", v)) => self.id = Some(v.to_owned()),
                    Some(("event", v)) => self.kind = Some(v.to_owned()),
                    Some(("data", v)) => self.data = Some(v.to_owned()),
                    _ => out.push(Item::Other(line)),
                }
            }
        }
        out
    }

    fn dispatch(&mut self) -> Option<Item> {
        let (id, kind, data) = (self.id.take(), self.kind.take(), self.data.take());
        match (id, kind, data) {
            (None, None, None) => None,
            (Some(id), Some(kind), Some(data)) => {
                match (id.parse::<u64>(), serde_json::from_str::<Value>(&data)) {
                    (Ok(id), Ok(data)) => Some(Item::Event(Sse { id, kind, data })),
                    _ => Some(Item::Other(format!(
                        "id: {id}, event: {kind}, data: {data}"
                    ))),
                }
            }
            other => Some(Item::Other(format!("an incomplete event: {other:?}"))),
        }
    }
}

/// `GET /v1/events` read by curl in the background; killed when dropped.
pub(crate) struct EventStream {
    _curl: Child,
    items: Receiver<Item>,
}

impl EventStream {
    /// Opens the stream with `auth` (curl arguments), resuming after
    /// `last_id` when given.
    pub(crate) fn open(srv: &Server, auth: &[String], last_id: Option<u64>) -> EventStream {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-N", "--max-time", "600", "--cacert"])
            .arg(srv.dir.join("admin/ca.crt"))
            .args(auth);
        if let Some(id) = last_id {
            cmd.args(["-H", &format!("Last-Event-ID: {id}")]);
        }
        // Guarded: ended with the test, pass or fail.
        let mut curl = spawn_cmd(
            cmd.arg(format!("{}/v1/events", srv.url()))
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let mut stdout = curl.0.stdout.take().unwrap();
        let (tx, items) = channel();
        std::thread::spawn(move || {
            let mut parser = SseParser::default();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    return;
                }
                for item in parser.feed(&buf[..n]) {
                    if tx.send(item).is_err() {
                        return;
                    }
                }
            }
        });
        EventStream { _curl: curl, items }
    }

    /// Everything read up to and with the first event `last` accepts;
    /// panics if none came within `limit` or the stream ended.
    pub(crate) fn read_until(&self, limit: Duration, last: impl Fn(&Sse) -> bool) -> Vec<Item> {
        let deadline = Instant::now() + limit;
        let mut read = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.items.recv_timeout(left) {
                Ok(item) => {
                    let done = matches!(&item, Item::Event(e) if last(e));
                    read.push(item);
                    if done {
                        return read;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "the awaited event did not come within {limit:?}; read {} items, the last: {:?}",
                    read.len(),
                    read.last()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the event stream ended before the awaited event; read {} items, the last: {:?}",
                    read.len(),
                    read.last()
                ),
            }
        }
    }

    /// Whether the server ends the stream within `limit` (what it still
    /// sends meanwhile is read and dropped). `false` means it was still
    /// open when `limit` ran out: an absence, only as good as `limit` is
    /// long.
    pub(crate) fn ends_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.items.recv_timeout(left) {
                Ok(_) if Instant::now() < deadline => {}
                Ok(_) | Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => return true,
            }
        }
    }
}

/// The events of `items`, or a panic naming what else was read.
pub(crate) fn events_only(items: Vec<Item>) -> Vec<Sse> {
    items
        .into_iter()
        .map(|item| match item {
            Item::Event(e) => e,
            Item::Other(what) => panic!("the stream said something other than an event: {what}"),
        })
        .collect()
}

/// A `rotate` event for `default/name`.
pub(crate) fn rotate_of(name: &str) -> impl Fn(&Sse) -> bool + '_ {
    move |e: &Sse| e.kind == "rotate" && e.data["namespace"] == "default" && e.data["name"] == name
}

/// Publishes one `rotate` event, for `default/name`.
pub(crate) fn rotate(srv: &Server, name: &str) {
    let (code, body) = srv.curl(
        "POST",
        &format!("/v1/identities/default/{name}/rotate"),
        None,
        &srv.admin(),
    );
    assert_eq!(code, 200, "{body}");
}

/// The admin issues a certificate for each of `names` (default namespace),
/// all through one curl on one connection: hundreds in a second or two.
pub(crate) fn issue_many(srv: &Server, dir: &Path, names: &[String]) {
    let admin = srv.dir.join("admin");
    let mut config = String::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            config.push_str("next\n");
        }
        config.push_str(&format!(
            "url = \"{}/v1/issue\"\ncacert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nheader = \"Content-Type: application/json\"\ndata = \"{{\\\"name\\\":\\\"{name}\\\"}}\"\nsilent\nshow-error\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}}\\n\"\n",
            srv.url(),
            admin.join("ca.crt").display(),
            admin.join("tls.crt").display(),
            admin.join("tls.key").display(),
        ));
    }
    let file = dir.join("issue-many.curlrc");
    std::fs::write(&file, config).unwrap();
    let out = Command::new("curl").arg("-K").arg(file).output().unwrap();
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        names.len(),
        "issuing {} identities: {codes}{}",
        names.len(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes many events: one `issued` per name (the issuances go through one
/// curl, on one connection), then `rounds` times `POST /v1/rotate`, a
/// `rotate` per live identity. Returns how many events that published.
fn flood(srv: &Server, dir: &Path, names: &[String], rounds: usize) -> u64 {
    issue_many(srv, dir, names);
    let mut events = names.len() as u64;
    for _ in 0..rounds {
        let (code, body) = srv.curl("POST", "/v1/rotate", None, &srv.admin());
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        events += v["rotating"].as_array().unwrap().len() as u64;
    }
    events
}

/// A `reset` event with `reason`.
fn reset_for(reason: &'static str) -> impl Fn(&Sse) -> bool {
    move |e: &Sse| e.kind == "reset" && e.data["reason"] == reason
}

#[test]
fn resuming_from_an_id_the_ring_dropped_is_told_with_a_reset() {
    const RING: u64 = 20;
    let tmp = scratch();
    let data = tmp.path().join("data");
    init_with(&data, "", &format!("events_per_identity = {RING}\n"));
    let srv = Server::start(&data, &[]);
    let admin = srv.admin();
    // The client's last event.
    let names = ["busy".to_owned(), "quiet".to_owned()];
    flood(&srv, tmp.path(), &names, 0);
    rotate(&srv, "quiet");
    let seen = events_only(
        EventStream::open(&srv, &admin, Some(0))
            .read_until(Duration::from_secs(30), rotate_of("quiet")),
    );
    let last_seen = seen.last().unwrap().id;
    // Nothing was dropped yet: no reset before it.
    assert!(seen.iter().all(|e| e.kind != "reset"), "{seen:?}");

    // While it is away, one identity has more events than its ring keeps.
    for _ in 0..RING + 5 {
        rotate(&srv, "busy");
    }
    rotate(&srv, "quiet");
    let published = RING + 6;

    // The client resumes from its last event: first it is told.
    let stream = EventStream::open(&srv, &admin, Some(last_seen));
    let got = events_only(stream.read_until(Duration::from_secs(60), rotate_of("quiet")));
    assert!(reset_for("ring")(&got[0]), "the first event: {:?}", got[0]);
    assert_eq!(
        got[0].id,
        last_seen + published,
        "the reset's id: level with the newest"
    );
    assert!(got[1..].iter().all(|e| e.kind == "rotate"), "{got:?}");
    // Then what the rings kept after its id, in order: busy's last RING
    // and quiet's rotate (quiet's ring dropped nothing).
    let kept = &got[1..];
    assert_eq!(kept.len() as u64, RING + 1, "{kept:?}");
    assert!(kept.windows(2).all(|w| w[1].id > w[0].id), "{kept:?}");
    assert_eq!(kept.last().unwrap().id, last_seen + published);
    assert_eq!(
        kept[0].id,
        last_seen + published - RING,
        "busy's oldest kept"
    );

    // A client that resumes from an id none of whose later events were
    // dropped is not told anything.
    let fresh = EventStream::open(&srv, &admin, Some(last_seen + published - RING));
    let read = events_only(fresh.read_until(Duration::from_secs(30), rotate_of("quiet")));
    assert!(read.iter().all(|e| e.kind == "rotate"), "{read:?}");

    // And the stream goes on.
    rotate(&srv, "later");
    let next = events_only(stream.read_until(Duration::from_secs(30), rotate_of("later")));
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].id, last_seen + published + 1);
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// An admin event stream over TLS that reads its answer's head, then
/// nothing until the test reads it: a subscriber that has stopped reading.
/// Returns the stream and the body bytes read with the head.
fn stalled_subscriber(srv: &Server) -> (Tls, Vec<u8>) {
    let dir = srv.dir.join("admin");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs = CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("tls.key")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let sock = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    // The head comes once the handler has subscribed.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    let end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = read_some(&mut s, &mut buf, deadline);
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && head.contains("transfer-encoding: chunked"),
        "{head}"
    );
    let rest = raw[end..].to_vec();
    (s, rest)
}

/// The body of a chunked answer, as its chunks complete.
#[derive(Debug, Default)]
struct Dechunker {
    raw: Vec<u8>,
}

impl Dechunker {
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.raw.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let rest = &self.raw[at..];
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let size_line = String::from_utf8_lossy(&rest[..eol]).into_owned();
            let size_text = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .unwrap_or_else(|_| panic!("not a chunk size: {size_line:?}"));
            assert!(size > 0, "the server ended the event stream");
            let start = eol + 2;
            if rest.len() < start + size + 2 {
                break;
            }
            out.extend_from_slice(&rest[start..start + size]);
            at += start + size + 2;
        }
        self.raw.drain(..at);
        out
    }
}

/// Reads the next bytes of `s` into `buf`, returning how many; panics when
/// the stream ends or nothing came by `deadline`.
fn read_some(s: &mut Tls, buf: &mut [u8], deadline: Instant) -> usize {
    loop {
        assert!(
            Instant::now() < deadline,
            "the event stream sent nothing in time"
        );
        match s.read(buf) {
            Ok(0) => panic!("the server closed the event stream"),
            Ok(n) => return n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the event stream: {e}"),
        }
    }
}

/// The subscriber's side of the stream: the raw reader, its parsers, and
/// what was parsed but not yet asked for.
struct Reader {
    s: Tls,
    dechunk: Dechunker,
    parser: SseParser,
    parsed: std::collections::VecDeque<Item>,
}

impl Reader {
    fn new(s: Tls, first: &[u8]) -> Reader {
        let mut reader = Reader {
            s,
            dechunk: Dechunker::default(),
            parser: SseParser::default(),
            parsed: std::collections::VecDeque::new(),
        };
        let body = reader.dechunk.feed(first);
        reader.parsed.extend(reader.parser.feed(&body));
        reader
    }

    /// Everything read up to and with the first event `last` accepts.
    fn until(&mut self, limit: Duration, last: impl Fn(&Sse) -> bool) -> Vec<Item> {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; 64 * 1024];
        let mut items = Vec::new();
        loop {
            while let Some(item) = self.parsed.pop_front() {
                let done = matches!(&item, Item::Event(e) if last(e));
                items.push(item);
                if done {
                    return items;
                }
            }
            let n = read_some(&mut self.s, &mut buf, deadline);
            let body = self.dechunk.feed(&buf[..n]);
            self.parsed.extend(self.parser.feed(&body));
        }
    }
}

#[test]
fn a_subscriber_that_falls_behind_the_broadcast_is_told_with_a_reset() {
    // tokio's broadcast in `Events::with_retention` (crates/meshca-server/src/events.rs).
    const BROADCAST: u64 = 4096;
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let (stalled, head_rest) = stalled_subscriber(&srv);

    // Far more events than the broadcast and the socket buffers hold (about
    // 2,400 of these fit in the buffers of a loopback connection that is not
    // read): long names make each event about 250 bytes. The server writes
    // events to a subscriber more slowly than a `POST /v1/rotate` publishes
    // them, so the subscriber may fall behind more than once while the
    // buffers still take some: how often is not fixed, what each time is.
    let names: Vec<String> = (0..500)
        .map(|i| format!("e{i:03}-{}", "x".repeat(58)))
        .collect();
    let mut published = flood(&srv, tmp.path(), &names, 40);
    rotate(&srv, "after");
    published += 1;

    // Now the subscriber reads again, up to the last event.
    let mut reader = Reader::new(stalled, &head_rest);
    let items = events_only(reader.until(Duration::from_secs(120), rotate_of("after")));
    assert!(
        items
            .iter()
            .all(|e| ["issued", "rotate", "reset"].contains(&e.kind.as_str())),
        "an event of another kind: {:?}",
        items
            .iter()
            .find(|e| !["issued", "rotate", "reset"].contains(&e.kind.as_str()))
    );
    // It read from the first event published after it subscribed...
    assert_eq!(items[0].kind, "issued", "{:?}", items[0]);
    assert_eq!(items[0].data["name"], names[0].as_str(), "{:?}", items[0]);
    let got: Vec<&Sse> = items.iter().filter(|e| e.kind != "reset").collect();
    assert!(
        got.windows(2).all(|w| w[1].id > w[0].id),
        "ids out of order"
    );
    let (first, last) = (got[0].id, got.last().unwrap().id);
    assert_eq!(last - first + 1, published, "ids grow by one per event");
    // Where it fell behind, the ids jump to the oldest event the broadcast
    // still held, and right before the jump it is told: a `reset` with
    // reason `lagged`, whose id is at least as new as what it skipped to.
    let resets: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].kind == "reset")
        .collect();
    let missed = published - got.len() as u64;
    assert!(
        !resets.is_empty() && missed > 0,
        "the subscriber never fell behind ({} of {published} events read): the test tests nothing",
        got.len()
    );
    for &i in &resets {
        assert!(reset_for("lagged")(&items[i]), "{:?}", items[i]);
        // It may fall behind again at once: the events around the resets.
        let before = items[..i].iter().rev().find(|e| e.kind != "reset").unwrap();
        let after = items[i + 1..].iter().find(|e| e.kind != "reset").unwrap();
        assert!(
            after.id > before.id + 1,
            "a reset where nothing was missed: {before:?} {:?} {after:?}",
            items[i]
        );
        assert!(
            after.id <= last + 1 - BROADCAST,
            "after a reset the stream went on at {}, less than {BROADCAST} before the last event {last}",
            after.id
        );
        assert!(items[i].id >= after.id, "{:?} {after:?}", items[i]);
    }
    // Every jump is announced.
    let jumps = (1..items.len())
        .filter(|&i| {
            items[i].kind != "reset"
                && items[i - 1].kind != "reset"
                && items[i].id != items[i - 1].id + 1
        })
        .count();
    assert_eq!(jumps, 0, "ids jumped without a reset");
    // And it goes on.
    rotate(&srv, "later");
    let more = events_only(reader.until(Duration::from_secs(30), rotate_of("later")));
    assert_eq!(more.len(), 1, "{more:?}");
    assert_eq!(more[0].id, last + 1);
}
