#!/usr/bin/env python3
"""The clients of bench/abuse.sh: the well-behaved probe and the attackers.

Python 3 standard library only. Each subcommand is its own process, so that
the attackers' threads never share an interpreter lock with the probe whose
latency is measured.

  probe     every --interval seconds a NEW TLS connection with a client
            certificate and one POST (connect to full answer timed); also
            GET /healthz of the agent every second (plain HTTP, new
            connection). Prints
            `p50_ms A p99_ms B ok N failed F agent_health_ok H agent_health_failed G`.
  anon      anonymous GET /metrics and GET /v1/crl, alternating, --rate per
            second in total over TLS without a client certificate
            (keep-alive, reconnecting when the server closes).
  halfopen  --per half-open connections on each target, re-opened when the
            server closes them: `tls:PORT` sends nothing or half a TLS
            ClientHello, `http:PORT` sends a request line and one header
            and stalls.
  streams   --streams concurrent GET /v1/events with one client certificate;
            a refused one retries after --retry-ms, an admitted one is held.
  revoke    issue --count certificates with the admin certificate and revoke
            each (so the CRL lists them).
  count     the store's records, from /metrics (`meshca_certificates`).

Attackers run until --seconds pass or SIGTERM, then print one line starting
with `attacker`. Every connection goes to 127.0.0.1; TLS names `localhost`.
"""

import argparse
import http.client
import json
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter

HOST = "127.0.0.1"
SNI = "localhost"

stop = threading.Event()


def on_term(_sig, _frame):
    stop.set()


def client_ctx(ca, cert=None, key=None):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def tls_conn(ctx, port, timeout):
    """An HTTPConnection over a fresh TLS connection to 127.0.0.1:port
    (http.client would try ::1 first for `localhost`)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        ssock = ctx.wrap_socket(sock, server_hostname=SNI)
    except BaseException:
        sock.close()
        raise
    conn = http.client.HTTPConnection(SNI, port, timeout=timeout)
    conn.sock = ssock
    return conn


def pct(sorted_ms, p):
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(int(len(sorted_ms) * p), len(sorted_ms) - 1)]


def run_until(seconds):
    """Wait until --seconds pass or SIGTERM."""
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    stop.wait(seconds)
    stop.set()


def top(counter, n=4):
    return ", ".join(f"{k} x{v}" for k, v in counter.most_common(n))


# --- the well-behaved client -------------------------------------------------


def cmd_probe(a):
    ctx = client_ctx(a.ca, a.cert, a.key)
    body = a.body.encode()
    lock = threading.Lock()
    lat = []
    fails = Counter()
    health = Counter()
    inflight = [0]

    def one():
        t0 = time.perf_counter()
        try:
            conn = tls_conn(ctx, a.port, a.timeout)
            try:
                conn.request("POST", a.path, body=body,
                             headers={"Content-Type": "application/json", "Connection": "close"})
                r = conn.getresponse()
                data = r.read()
            finally:
                conn.close()
            ms = (time.perf_counter() - t0) * 1000
            if r.status != 200:
                why = f"HTTP {r.status}"
                try:
                    why += ": " + json.loads(data)["error"]["message"][:80]
                except Exception:
                    pass
                with lock:
                    fails[why] += 1
            elif b'"certificate"' not in data:
                with lock:
                    fails["200 without a certificate"] += 1
            else:
                with lock:
                    lat.append(ms)
        except Exception as e:  # a refused, reset or timed-out connection
            with lock:
                fails[type(e).__name__ + (f": {e}"[:60] if str(e) else "")] += 1
        finally:
            with lock:
                inflight[0] -= 1

    def agent_health():
        host, _, port = a.agent_health.rpartition(":")
        while not stop.wait(1.0):
            try:
                c = http.client.HTTPConnection(host, int(port), timeout=a.timeout)
                c.request("GET", "/healthz", headers={"Connection": "close"})
                r = c.getresponse()
                r.read()
                c.close()
                health["ok" if r.status == 200 else f"HTTP {r.status}"] += 1
            except Exception as e:
                health[type(e).__name__] += 1

    threads = []
    if a.agent_health:
        h = threading.Thread(target=agent_health, daemon=True)
        h.start()
    start = time.monotonic()
    i = 0
    while True:
        due = start + i * a.interval
        if due >= start + a.seconds:
            break
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        with lock:
            if inflight[0] >= a.max_inflight:
                fails[f"over {a.max_inflight} requests in flight"] += 1
                i += 1
                continue
            inflight[0] += 1
        # A thread per request, started on schedule: a slow answer does not
        # delay the next request (no coordinated omission).
        t = threading.Thread(target=one, daemon=True)
        t.start()
        threads.append(t)
        i += 1
    for t in threads:
        t.join(a.timeout + 5)
    stop.set()
    lat.sort()
    nfail = sum(fails.values())
    hfail = sum(v for k, v in health.items() if k != "ok")
    print(f"p50_ms {pct(lat, 0.5):.2f} p99_ms {pct(lat, 0.99):.2f} ok {len(lat)} failed {nfail} "
          f"agent_health_ok {health['ok']} agent_health_failed {hfail}")
    if nfail:
        print(f"probe failures: {top(fails)}", file=sys.stderr)
    if hfail:
        print(f"agent /healthz failures: {top(Counter({k: v for k, v in health.items() if k != 'ok'}))}",
              file=sys.stderr)


# --- anonymous flood ---------------------------------------------------------


def cmd_anon(a):
    ctx = client_ctx(a.ca)
    paths = ["/metrics", "/v1/crl"]
    lock = threading.Lock()
    status = Counter()
    errors = Counter()
    lat = []
    sched = {"next": 0, "skipped": 0}
    start = time.monotonic()
    interval = 1.0 / a.rate

    def ticket():
        # One shared schedule at --rate; a ticket more than 1 s late (every
        # worker busy) is dropped, not sent in a burst.
        with lock:
            while True:
                n = sched["next"]
                sched["next"] += 1
                due = start + n * interval
                if time.monotonic() - due <= 1.0:
                    return n, due
                sched["skipped"] += 1

    def worker():
        conn = None
        while not stop.is_set():
            n, due = ticket()
            wait = due - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            path = paths[n % 2]
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = tls_conn(ctx, a.port, a.timeout)
                conn.request("GET", path, headers={} if a.keepalive else {"Connection": "close"})
                r = conn.getresponse()
                r.read()
                with lock:
                    status[f"{path} {r.status}"] += 1
                    lat.append((time.perf_counter() - t0) * 1000)
                if not a.keepalive or r.will_close:
                    conn.close()
                    conn = None
            except Exception as e:
                with lock:
                    errors[type(e).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
                stop.wait(0.05)
        if conn is not None:
            conn.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(a.threads)]
    for t in ts:
        t.start()
    run_until(a.seconds)
    for t in ts:
        t.join(a.timeout + 2)
    el = time.monotonic() - start
    sent = sum(status.values())
    lat.sort()
    print(f"attacker anon-flood answered {sent} ({sent / el:.0f}/s of {a.rate:g}/s offered) "
          f"p50_ms {pct(lat, 0.5):.1f} p99_ms {pct(lat, 0.99):.1f} "
          f"statuses [{top(status, 6)}] errors {sum(errors.values())} [{top(errors)}] "
          f"dropped_late {sched['skipped']}")


# --- half-open connections ---------------------------------------------------


def half_hello():
    """The first half of a real TLS 1.3 ClientHello."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=SNI)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    return hello[: len(hello) // 2]


def cmd_halfopen(a):
    hello = half_hello()
    sel = selectors.DefaultSelector()
    targets = []
    for spec in a.targets:
        kind, _, port = spec.partition(":")
        if kind not in ("tls", "http"):
            sys.exit(f"unknown target kind {kind!r}")
        targets.append({"kind": kind, "port": int(port), "open": 0, "opened": 0,
                        "closed_by_server": 0, "connect_failed": 0, "samples": []})
    pending = {}  # sock -> (target, index, started)

    def payload(t, idx):
        if t["kind"] == "http":
            return b"GET / HTTP/1.1\r\nHost: x\r\n"
        return b"" if idx % 2 == 0 else hello  # nothing, or half a ClientHello

    def open_one(t, idx):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((HOST, t["port"]))
        if err not in (0, 115):  # EINPROGRESS
            s.close()
            t["connect_failed"] += 1
            want.append((t, idx))
            return
        pending[s] = (t, idx, time.monotonic())
        sel.register(s, selectors.EVENT_WRITE, (t, idx))

    def connected(s, t, idx):
        del pending[s]
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sel.unregister(s)
            s.close()
            t["connect_failed"] += 1
            want.append((t, idx))
            return False
        p = payload(t, idx)
        try:
            if p:
                s.send(p)
        except OSError:
            sel.unregister(s)
            s.close()
            t["closed_by_server"] += 1
            want.append((t, idx))
            return False
        sel.modify(s, selectors.EVENT_READ, (t, idx))
        t["open"] += 1
        t["opened"] += 1
        return True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    start = time.monotonic()
    want = []  # (target, idx) to (re)open
    for t in targets:
        want += [(t, i) for i in range(a.per)]
    last_sample = start
    while not stop.is_set() and time.monotonic() - start < a.seconds:
        # Open at most 100 per round, so a full backlog does not stall us.
        batch, want[:] = want[:100], want[100:]
        for t, idx in batch:
            open_one(t, idx)
        for key, ev in sel.select(timeout=0.05):
            s = key.fileobj
            t, idx = key.data
            if s in pending:
                connected(s, t, idx)
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # the server gave up on it: open another
                sel.unregister(s)
                s.close()
                t["open"] -= 1
                t["closed_by_server"] += 1
                want.append((t, idx))
        now = time.monotonic()
        for s, (t, idx, started) in list(pending.items()):
            if now - started > 3.0:  # not accepted within 3 s
                del pending[s]
                sel.unregister(s)
                s.close()
                t["connect_failed"] += 1
                want.append((t, idx))
        if now - last_sample >= 1.0:
            last_sample = now
            for t in targets:
                t["samples"].append(t["open"])
    parts = []
    for t in targets:
        smp = t["samples"][2:] or t["samples"] or [0]  # past the ramp-up
        parts.append(f"{t['kind']}:{t['port']} open min {min(smp)} avg {sum(smp) / len(smp):.0f} "
                     f"max {max(smp)} (of {a.per}) closed_by_server {t['closed_by_server']} "
                     f"connect_failed {t['connect_failed']}")
    print("attacker half-open " + "; ".join(parts))
    for key in list(sel.get_map().values()):
        key.fileobj.close()


# --- event streams from one identity -----------------------------------------


def cmd_streams(a):
    ctx = client_ctx(a.ca, a.cert, a.key)
    lock = threading.Lock()
    state = {"open": 0, "max_open": 0, "admitted": 0}
    refused = Counter()
    errors = Counter()
    ended = Counter()
    req = (f"GET /v1/events HTTP/1.1\r\nHost: {SNI}\r\nAccept: text/event-stream\r\n\r\n").encode()

    def worker():
        while not stop.is_set():
            s = None
            try:
                raw = socket.create_connection((HOST, a.port), timeout=a.timeout)
                s = ctx.wrap_socket(raw, server_hostname=SNI)
                s.sendall(req)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed before the answer")
                    head += chunk
                code = int(head.split(b" ", 2)[1])
                if code != 200:
                    with lock:
                        refused[code] += 1
                    s.close()
                    stop.wait(a.retry_ms / 1000)
                    continue
                with lock:
                    state["admitted"] += 1
                    state["open"] += 1
                    state["max_open"] = max(state["max_open"], state["open"])
                s.settimeout(0.5)
                why = "stop"
                while not stop.is_set():
                    try:
                        if not s.recv(65536):
                            why = "closed by server"
                            break
                    except socket.timeout:
                        continue
                    except (OSError, ssl.SSLError) as e:
                        why = type(e).__name__
                        break
                with lock:
                    state["open"] -= 1
                    ended[why] += 1
                s.close()
            except Exception as e:
                with lock:
                    errors[type(e).__name__] += 1
                if s is not None:
                    s.close()
                stop.wait(a.retry_ms / 1000)

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(a.streams)]
    for t in ts:
        t.start()
    run_until(a.seconds)
    for t in ts:
        t.join(a.timeout + 2)
    print(f"attacker streams {a.streams} wanted, admitted {state['admitted']} times "
          f"(at most {state['max_open']} open at once) refused {sum(refused.values())} "
          f"[{top(Counter({f'HTTP {k}': v for k, v in refused.items()}))}] "
          f"ended_early {sum(v for k, v in ended.items() if k != 'stop')} [{top(ended)}] "
          f"errors {sum(errors.values())} [{top(errors)}]")


# --- setup helpers -----------------------------------------------------------


def cmd_revoke(a):
    ctx = client_ctx(a.ca, a.cert, a.key)
    conn = tls_conn(ctx, a.port, 30)
    hdr = {"Content-Type": "application/json"}

    def post(path, body):
        nonlocal conn
        for attempt in range(3):
            try:
                conn.request("POST", path, body=json.dumps(body).encode(), headers=hdr)
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    sys.exit(f"{path}: HTTP {r.status}: {data[:200]!r}")
                return json.loads(data)
            except (OSError, http.client.HTTPException):
                if attempt == 2:
                    raise
                conn.close()
                conn = tls_conn(ctx, a.port, 30)

    done = 0
    for i in range(a.count):
        serial = post("/v1/issue", {"name": a.name})["serial"]
        post(f"/v1/certificates/{serial}/revoke", {"reason": "superseded"})
        done += 1
    conn.close()
    print(done)


def cmd_count(a):
    ctx = client_ctx(a.ca)
    conn = tls_conn(ctx, a.port, a.timeout)
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    if r.status != 200:
        sys.exit(f"/metrics: HTTP {r.status}")
    by = {}
    for line in text.splitlines():
        if line.startswith("meshca_certificates{"):
            status = line.split('"')[1]
            by[status] = int(float(line.rsplit(" ", 1)[1]))
    print(sum(by.values()), " ".join(f"{k}={v}" for k, v in sorted(by.items())))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, cert=False):
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--ca", required=True)
        if cert:
            sp.add_argument("--cert", required=True)
            sp.add_argument("--key", required=True)
        sp.add_argument("--timeout", type=float, default=10.0)

    sp = sub.add_parser("probe")
    common(sp, cert=True)
    sp.add_argument("--path", default="/v1/issue")
    sp.add_argument("--body", default='{"name":"probe"}')
    sp.add_argument("--interval", type=float, default=0.05)
    sp.add_argument("--seconds", type=float, required=True)
    sp.add_argument("--agent-health", default="", help="HOST:PORT of the agent's --health")
    sp.add_argument("--max-inflight", type=int, default=400)
    sp = sub.add_parser("anon")
    common(sp)
    sp.add_argument("--rate", type=float, default=200)
    sp.add_argument("--threads", type=int, default=32)
    sp.add_argument("--keepalive", type=int, default=1)
    sp.add_argument("--seconds", type=float, default=3600)
    sp = sub.add_parser("halfopen")
    sp.add_argument("--targets", nargs="+", required=True, help="tls:PORT or http:PORT")
    sp.add_argument("--per", type=int, default=190)
    sp.add_argument("--seconds", type=float, default=3600)
    sp = sub.add_parser("streams")
    common(sp, cert=True)
    sp.add_argument("--streams", type=int, default=50)
    sp.add_argument("--retry-ms", type=float, default=250)
    sp.add_argument("--seconds", type=float, default=3600)
    sp = sub.add_parser("revoke")
    common(sp, cert=True)
    sp.add_argument("--count", type=int, default=300)
    sp.add_argument("--name", default="revoked")
    sp = sub.add_parser("count")
    common(sp)
    a = p.parse_args()
    {"probe": cmd_probe, "anon": cmd_anon, "halfopen": cmd_halfopen, "streams": cmd_streams,
     "revoke": cmd_revoke, "count": cmd_count}[a.cmd](a)


if __name__ == "__main__":
    main()
