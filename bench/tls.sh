#!/usr/bin/env bash
# meshca-tls (the `hello` example in mtls mode) against nginx configured for
# the same mTLS, in one run, with the same clients:
#  - full handshakes per second: `tls_load` (crates/meshca-tls/examples),
#    a new connection + full TLS 1.3 handshake with a client certificate +
#    GET / per request, no resumption, X25519 for both servers;
#  - bulk throughput: curl downloading BULK_MB MiB over mTLS.
# Prints medians and the meshca/nginx ratios.
#
#   bench/tls.sh                         # 3 rounds of 5 s, 256 MiB
#   ROUNDS=5 SECONDS_PER_ROUND=10 BULK_MB=1024 bench/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_ROUND:-5}"
BULK_MB="${BULK_MB:-256}"
CONC="${CONCURRENCY:-16}"

have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
have nginx || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
have curl || as_root apt-get install -y -qq curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet -p meshca --bin meshca
cargo build --release --quiet -p meshca-tls --example hello --example tls_load
M=target/release/meshca
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

$M init --dir "$work/ca" >/dev/null
$M --dir "$work/ca" issue web --profile server --dns localhost --ip 127.0.0.1 --out "$work/server" >/dev/null
$M --dir "$work/ca" issue load --profile client --out "$work/client" >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MESHCA_PORT=$(free_port)
NGINX_PORT=$(free_port)

mkdir -p "$work/www" "$work/nginx"
head -c $((BULK_MB * 1024 * 1024)) /dev/zero | tr '\0' x > "$work/www/bulk"
cat > "$work/nginx/nginx.conf" <<CONF
user $(id -un);
worker_processes 2;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  server {
    listen 127.0.0.1:$NGINX_PORT ssl;
    ssl_certificate $work/server/tls.crt;
    ssl_certificate_key $work/server/tls.key;
    ssl_client_certificate $work/server/ca.crt;
    ssl_verify_client on;
    ssl_verify_depth 2;
    ssl_protocols TLSv1.3;
    ssl_session_tickets off;
    ssl_session_cache off;
    location = / { return 200 "ok\n"; }
    location = /bulk { root $work/www; }
  }
}
CONF
"$NGINX" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
pids+=($!)
RUST_LOG=warn target/release/examples/hello --mode mtls --certs "$work/server" --listen "127.0.0.1:$MESHCA_PORT" 2>"$work/hello.log" &
pids+=($!)
for port in "$MESHCA_PORT" "$NGINX_PORT"; do
  tries=0
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    tries=$((tries + 1)); [ "$tries" -lt 100 ] || { echo "nothing listens on $port"; cat "$work"/*.log "$work"/nginx/error.log; exit 1; }
    sleep 0.1
  done
done

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# A run with errors measures nothing: it fails, saying so (after printing
# what it measured).
invalid() { echo "invalid run: $*" >&2; exit 1; }
# Full handshakes per second and failed handshakes: `RATE FAILED`.
hs() {
  local out rate failed
  out=$(target/release/examples/tls_load --addr "127.0.0.1:$1" --certs "$work/client" --name localhost \
          --seconds "$SECS" --concurrency "$CONC") || { echo "tls_load against port $1 failed" >&2; return 1; }
  rate=$(awk '/^handshakes_per_sec/ {print $2}' <<<"$out")
  failed=$(awk '/^failed/ {print $2}' <<<"$out")
  [ -n "$rate" ] && [ -n "$failed" ] || { echo "tls_load said: $out" >&2; return 1; }
  echo "$rate $failed"
}
# Bytes per second of one download, which must be complete.
bulk() { # url bytes
  local out
  out=$(curl -sS --fail -o /dev/null -w '%{speed_download} %{size_download}' --cacert "$work/client/ca.crt" \
          --cert "$work/client/tls.crt" --key "$work/client/tls.key" "$1") || { echo "curl $1 failed" >&2; return 1; }
  [ "${out#* }" = "$2" ] || { echo "curl $1: ${out#* } bytes of $2" >&2; return 1; }
  echo "${out%% *}"
}

BYTES=$((BULK_MB * 1024 * 1024))
# Warm up both (meshca's hello allocates its bulk buffer on first use).
bulk "https://localhost:$MESHCA_PORT/bulk?bytes=$BYTES" "$BYTES" >/dev/null || invalid "warm-up download from meshca"
bulk "https://localhost:$NGINX_PORT/bulk" "$BYTES" >/dev/null || invalid "warm-up download from nginx"
m_hs=(); n_hs=(); m_bulk=(); n_bulk=(); m_failed=0; n_failed=0
for r in $(seq "$ROUNDS"); do
  m=$(hs "$MESHCA_PORT") || invalid "round $r: meshca's handshakes"
  n=$(hs "$NGINX_PORT") || invalid "round $r: nginx's handshakes"
  m_hs+=("${m% *}"); n_hs+=("${n% *}")
  m_failed=$((m_failed + ${m#* })); n_failed=$((n_failed + ${n#* }))
  mb=$(bulk "https://localhost:$MESHCA_PORT/bulk?bytes=$BYTES" "$BYTES") || invalid "round $r: meshca's download"
  nb=$(bulk "https://localhost:$NGINX_PORT/bulk" "$BYTES") || invalid "round $r: nginx's download"
  m_bulk+=("$mb"); n_bulk+=("$nb")
  echo "round $r: handshakes/s meshca ${m_hs[-1]} (${m#* } failed) nginx ${n_hs[-1]} (${n#* } failed); bulk B/s meshca ${m_bulk[-1]} nginx ${n_bulk[-1]}"
done
MH=$(printf '%s\n' "${m_hs[@]}" | median); NH=$(printf '%s\n' "${n_hs[@]}" | median)
MB=$(printf '%s\n' "${m_bulk[@]}" | median); NB=$(printf '%s\n' "${n_bulk[@]}" | median)
echo "== medians over $ROUNDS rounds (mTLS, TLS 1.3, P-256 certificates, $CONC concurrent clients)"
awk -v m="$MH" -v n="$NH" 'BEGIN {printf "full handshakes/s  meshca %8.0f   nginx %8.0f   ratio %.2f\n", m, n, m/n}'
awk -v m="$MB" -v n="$NB" 'BEGIN {printf "bulk MiB/s         meshca %8.1f   nginx %8.1f   ratio %.2f\n", m/1048576, n/1048576, m/n}'
echo "failed handshakes  meshca $m_failed   nginx $n_failed (over $ROUNDS rounds)"
echo "(target: meshca handshakes/s at least nginx's)"
# A handshake that failed is a refused client or a dropped connection: the
# rates above are not those of a working server.
[ "$m_failed" = 0 ] && [ "$n_failed" = 0 ] || invalid "$m_failed failed handshakes with meshca, $n_failed with nginx"
