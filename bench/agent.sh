#!/usr/bin/env bash
# Resident memory of one `meshca agent` (release build) holding a certificate
# against a local `meshca serve`, sampled after the first certificate and
# after renewals. Target: under 15 MiB.
#   bench/agent.sh            # 30 s with a 9 s lifetime (about 4 renewals)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECONDS_TOTAL:-30}"
cargo build --release --quiet -p meshca --bin meshca
M=target/release/meshca
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# A run with errors measures nothing: it fails, saying so.
invalid() { echo "invalid run: $*" >&2; tail -n 20 "$work"/*.log >&2 || true; exit 1; }
wait_until() { # what seconds command...
  local what=$1 secs=$2 tries=0; shift 2
  until "$@"; do
    tries=$((tries + 1)); [ "$tries" -lt $((secs * 10)) ] || invalid "$what not within ${secs}s"; sleep 0.1
  done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$M serve --dir "$work/data" --listen "127.0.0.1:$PORT" 2>"$work/serve.log" &
pids+=($!)
wait_until "meshca serve listening" 30 port_open "$PORT"; sleep 0.5
export MESHCA_SERVER="https://localhost:$PORT" MESHCA_DIR="$work/data"
J=$($M token create web --json)
TOKEN=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["token"])' "$J")
FP=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ca_fingerprint"])' "$J")
$M agent web --token "$TOKEN" --ca-fingerprint "$FP" --out "$work/web" --ttl 9s \
  --on-rotate "echo x >> $work/hook.log" 2>"$work/agent.log" &
AGENT=$!
pids+=($AGENT)
rss() { awk '/VmRSS/ {print $2}' "/proc/$AGENT/status"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$AGENT/status"; }
wait_until "the agent's first certificate" 30 test -s "$work/hook.log"
echo "after the first certificate: RSS $(rss) KiB"
sleep "$SECS"
kill -0 "$AGENT" 2>/dev/null || invalid "the agent exited during the run"
certs=$(wc -l < "$work/hook.log")
echo "after $certs certificates in ${SECS}s: RSS $(rss) KiB, peak $(hwm) KiB (target: under 15360 KiB)"
# A 9 s lifetime renews every few seconds: a run without renewals measured an
# idle agent; one whose agent logged errors measured a failing one.
[ "$certs" -ge 2 ] || invalid "no renewal in ${SECS}s ($certs certificate)"
! grep -q "ERROR" "$work/agent.log" || invalid "the agent logged errors: $(grep -m 3 ERROR "$work/agent.log")"
