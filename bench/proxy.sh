#!/usr/bin/env bash
# meshca proxy (server side) against stunnel4 and haproxy in the same mTLS
# role: same certificates (P-256, issued by meshca), same target, same
# client (crates/meshca-proxy/examples/proxybench.rs), one run, one machine.
#
#   bench/proxy.sh                     # 3 rounds, 10 s per measurement
#   ROUNDS=5 SECONDS_PER_RUN=10 bench/proxy.sh
#
# Measures: full TLS 1.3 handshakes per second with a client certificate
# (each followed by one echoed byte), throughput of one 1 GiB stream, and
# p50/p99 latency of 64-byte echoes over kept-alive connections. Installs
# stunnel4 and haproxy from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${SECONDS_PER_RUN:-10}"
ROUNDS="${ROUNDS:-3}"
HS_CONNS="${HANDSHAKE_CONNECTIONS:-16}"
LAT_CONNS="${LATENCY_CONNECTIONS:-8}"
BYTES="${BYTES:-1073741824}"
have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
{ have stunnel4 && have haproxy; } || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4 haproxy; }

cargo build --release --quiet -p meshca --bin meshca
cargo build --release --quiet -p meshca-proxy --example proxybench
M=target/release/meshca
B=target/release/examples/proxybench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
# A run with errors measures nothing: it fails, saying so.
invalid() { echo "invalid run: $*" >&2; tail -n 5 "$work"/*.log >&2 || true; exit 1; }
# One measurement: proxybench's line, or an invalid run when it failed (the
# latency and throughput modes stop at the first error) or counted failed
# handshakes.
measure() { # label proxybench-args...
  local label=$1 out failed ok; shift
  out=$($B "$@") || invalid "$label: proxybench failed"
  failed=$(awk '{for (i = 1; i < NF; i++) if ($i == "failed") print $(i+1)}' <<<"$out")
  ok=$(awk '{for (i = 1; i < NF; i++) if ($i == "ok") print $(i+1)}' <<<"$out")
  [ -z "$failed" ] || [ "$failed" = 0 ] || invalid "$label: $failed failed handshakes: $out"
  [ "${ok:-1}" != 0 ] || invalid "$label: no handshake succeeded: $out"
  echo "$label $out"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  local tries=0
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    tries=$((tries + 1)); [ "$tries" -lt 200 ] || invalid "nothing listens on $1"; sleep 0.1
  done
}

# Certificates: the server's (localhost) and a client's, from one meshca CA.
$M init --dir "$work/ca" >/dev/null 2>&1
$M --dir "$work/ca" issue proxy --dns localhost --out "$work/server" >/dev/null
$M --dir "$work/ca" issue client --out "$work/client" >/dev/null
cat "$work/server/tls.crt" "$work/server/tls.key" > "$work/server/combined.pem"

T=$(free_port)
$B target --port "$T" & pids+=($!)
wait_port "$T"

# meshca proxy server: mTLS, any client the bundle trusts.
MP=$(free_port)
RUST_LOG=error $M proxy server --listen "127.0.0.1:$MP" --target "127.0.0.1:$T" --certs "$work/server" 2>"$work/meshca.log" &
pids+=($!)

# stunnel4: the same role (verify the client's chain, TLS 1.3 only).
SP=$(free_port)
cat > "$work/stunnel.conf" <<CONF
foreground = yes
pid =
debug = 3
[mtls]
accept = 127.0.0.1:$SP
connect = 127.0.0.1:$T
cert = $work/server/tls.crt
key = $work/server/tls.key
CAfile = $work/server/ca.crt
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
CONF
stunnel4 "$work/stunnel.conf" 2>"$work/stunnel.log" &
pids+=($!)

# haproxy: the same role in TCP mode, one thread per core.
HP=$(free_port)
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread $(nproc)
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend mtls
  bind 127.0.0.1:$HP ssl crt $work/server/combined.pem ca-file $work/server/ca.crt verify required ssl-min-ver TLSv1.3
  default_backend target
backend target
  server t 127.0.0.1:$T
CONF
haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" &
pids+=($!)
wait_port "$MP"; wait_port "$SP"; wait_port "$HP"

C="$work/client"
for round in $(seq "$ROUNDS"); do
  for p in meshca:$MP stunnel:$SP haproxy:$HP; do
    name=${p%%:*}; port=${p##*:}
    measure "$name handshakes" handshakes --addr "127.0.0.1:$port" --certs "$C" --conns "$HS_CONNS" --seconds "$SECS"
    measure "$name latency" latency --addr "127.0.0.1:$port" --certs "$C" --conns "$LAT_CONNS" --seconds "$SECS"
    measure "$name throughput" throughput --addr "127.0.0.1:$port" --certs "$C" --bytes "$BYTES"
  done
  measure "direct latency" latency --addr "127.0.0.1:$T" --plain --conns "$LAT_CONNS" --seconds "$SECS"
done | tee "$work/results"

med() { # name kind field
  awk -v n="$1" -v k="$2" -v f="$3" '$1 == n && $2 == k { for (i = 3; i < NF; i++) if ($i == f) print $(i+1) }' "$work/results" \
    | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
base99=$(med direct latency p99_us); base50=$(med direct latency p50_us)
printf "== medians of %s rounds (direct, no proxy: p50 %s us, p99 %s us)\n" "$ROUNDS" "$base50" "$base99"
printf "%-8s %14s %12s %10s %10s %14s\n" proxy handshakes/s MiB/s p50_us p99_us added_p99_us
for n in meshca stunnel haproxy; do
  printf "%-8s %14s %12s %10s %10s %14s\n" "$n" "$(med $n handshakes handshakes_per_s)" "$(med $n throughput mib_per_s)" \
    "$(med $n latency p50_us)" "$(med $n latency p99_us)" "$(( $(med $n latency p99_us) - base99 ))"
done
awk -v mh="$(med meshca handshakes handshakes_per_s)" -v hh="$(med haproxy handshakes handshakes_per_s)" \
    -v mt="$(med meshca throughput mib_per_s)" -v ht="$(med haproxy throughput mib_per_s)" \
    -v ml="$(( $(med meshca latency p99_us) - base99 ))" -v hl="$(( $(med haproxy latency p99_us) - base99 ))" 'BEGIN {
  printf "== meshca / haproxy: handshakes %.2fx (target >= 1), throughput %.0f%% (target >= 90%%), added p99 %d us vs %d us (target: at most haproxy'"'"'s)\n",
    mh / hh, 100 * mt / ht, ml, hl }'
