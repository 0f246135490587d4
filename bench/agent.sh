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
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$M serve --dir "$work/data" --listen "127.0.0.1:$PORT" 2>"$work/serve.log" &
pids+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do sleep 0.1; done; sleep 0.5
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
until [ -s "$work/hook.log" ]; do sleep 0.1; done
echo "after the first certificate: RSS $(rss) KiB"
sleep "$SECS"
echo "after $(wc -l < "$work/hook.log") certificates in ${SECS}s: RSS $(rss) KiB, peak $(hwm) KiB (target: under 15360 KiB)"
