#!/usr/bin/env bash
# Issuance rate with the etcd store (three etcd members on loopback) against
# the embedded store, in one run on one machine, with one load generator.
#
#   bench/etcd.sh                        # 3 rounds of 10 s per run at 32, 64 and 128 connections
#   ROUNDS=5 SECONDS_PER_RUN=20 CONNECTIONS=32 bench/etcd.sh
#
# The runs alternate (embedded, etcd, embedded, etcd, ...) and the medians
# are compared: the machine is noisy. Each load level gets its ratio; with
# several levels, the capacities (each store's best median over the levels)
# are compared too. A store that waits on a raft round needs more requests
# in flight to reach its rate (rate = requests in flight / latency), so one
# level alone understates the slower-to-commit store.
#
# Installs etcd from Debian (etcd-server, etcd-client) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${SECONDS_PER_RUN:-10}"
ROUNDS="${ROUNDS:-3}"
LEVELS="${CONNECTIONS:-32 64 128}"
have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
{ have etcd && have etcdctl; } || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client; }

cargo build --release --quiet -p meshca --bin meshca
cargo build --release --quiet -p meshca-client --example loadgen
M=target/release/meshca
LOAD=target/release/examples/loadgen
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
# A run with errors measures nothing: it fails, saying so.
invalid() { echo "invalid run: $*" >&2; exit 1; }
# loadgen's line: `rate R p50_ms A p99_ms B ok N errors M`; any error, or no
# answer at all, invalidates the run.
check_run() { # label line
  local ok errors
  ok=$(awk '{for (i = 1; i < NF; i++) if ($i == "ok") print $(i+1)}' <<<"$2")
  errors=$(awk '{for (i = 1; i < NF; i++) if ($i == "errors") print $(i+1)}' <<<"$2")
  [ -n "$ok" ] && [ -n "$errors" ] && [ "$errors" = 0 ] && [ "$ok" != 0 ] \
    || invalid "$1: ${errors:-?} errors, ${ok:-?} answered: $2"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # dir port
  local tries=0
  until curl -sf --cacert "$1/admin/ca.crt" "https://localhost:$2/readyz" >/dev/null 2>&1; do
    tries=$((tries + 1)); [ "$tries" -lt 300 ] || invalid "meshca on $2 did not become ready"; sleep 0.1
  done
}

# --- three etcd members
cluster=""; endpoints=""
for i in 0 1 2; do
  cp[$i]=$(free_port); pp[$i]=$(free_port)
  cluster="${cluster:+$cluster,}m$i=http://127.0.0.1:${pp[$i]}"
  endpoints="${endpoints:+$endpoints,}127.0.0.1:${cp[$i]}"
done
for i in 0 1 2; do
  etcd --name "m$i" --data-dir "$work/etcd$i" \
    --listen-client-urls "http://127.0.0.1:${cp[$i]}" --advertise-client-urls "http://127.0.0.1:${cp[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${pp[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${pp[$i]}" \
    --initial-cluster "$cluster" --initial-cluster-state new >"$work/etcd$i.log" 2>&1 &
  pids+=($!)
done
tries=0
until ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1; do
  tries=$((tries + 1)); [ "$tries" -lt 150 ] || invalid "etcd not healthy within 30s: $(tail -n 5 "$work"/etcd*.log)"; sleep 0.2
done

# --- meshca on each store
EP=$(free_port); XP=$(free_port)
$M serve --dir "$work/embedded" --listen "127.0.0.1:$EP" 2>"$work/embedded.log" &
pids+=($!)
$M serve --dir "$work/etcd" --listen "127.0.0.1:$XP" --store "etcd://$endpoints/bench/" \
  --seal-key-file "$work/seal.key" 2>"$work/etcd.log" &
pids+=($!)
wait_ready "$work/embedded" "$EP"
wait_ready "$work/etcd" "$XP"

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/csr.key" \
  -out "$work/csr.pem" -subj "/CN=web" 2>/dev/null
CSR_JSON=$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()))' "$work/csr.pem")
echo '{"name":"web","key_type":"ecdsa-p256"}' > "$work/issue.json"
echo "{\"name\":\"web\",\"csr\":$CSR_JSON}" > "$work/sign.json"

run() { # label connections dir port path body
  local out
  out=$($LOAD --url "https://localhost:$4$5" --body "$6" --connections "$2" --seconds "$SECS" \
    --ca "$3/admin/ca.crt" --cert "$3/admin/tls.crt" --key "$3/admin/tls.key") || invalid "$1@$2: loadgen failed"
  check_run "$1@$2" "$out"
  echo "$1@$2 $out"
}
for round in $(seq "$ROUNDS"); do
  for c in $LEVELS; do
    run embedded-issue "$c" "$work/embedded" "$EP" /v1/issue "$work/issue.json"
    run etcd-issue "$c" "$work/etcd" "$XP" /v1/issue "$work/issue.json"
    run embedded-sign "$c" "$work/embedded" "$EP" /v1/sign "$work/sign.json"
    run etcd-sign "$c" "$work/etcd" "$XP" /v1/sign "$work/sign.json"
  done
done | tee "$work/results"

# The median rate of a label over the rounds.
rate() { awk -v l="$1" '$1 == l {print $3}' "$work/results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { # what etcd embedded
  awk -v e="$2" -v m="$3" -v k="$1" \
    'BEGIN {printf "== %s: etcd store %.0f certs/s, embedded store %.0f certs/s, ratio %.0f%%\n", k, e, m, 100*e/m}'
}
for kind in issue sign; do
  best_e=0; best_m=0
  for c in $LEVELS; do
    e=$(rate "etcd-$kind@$c"); m=$(rate "embedded-$kind@$c")
    ratio "$kind at $c connections (medians)" "$e" "$m"
    best_e=$(awk -v a="$best_e" -v b="$e" 'BEGIN {print (b > a ? b : a)}')
    best_m=$(awk -v a="$best_m" -v b="$m" 'BEGIN {print (b > a ? b : a)}')
  done
  if [ "$(echo "$LEVELS" | wc -w)" -gt 1 ]; then
    ratio "$kind capacity (best median of each store)" "$best_e" "$best_m"
  fi
done
echo "(target: the etcd store at least 50% of the embedded rate)"
