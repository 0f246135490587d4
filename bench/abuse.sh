#!/usr/bin/env bash
# One well-behaved client under attack: `meshca serve` (release build) with a
# store of 200,000 records (a few hundred revoked), a probe that opens a NEW
# TLS connection with the admin certificate every 50 ms and asks for one
# certificate (POST /v1/issue), and one `meshca agent` renewing a 30 s
# certificate the whole time. Phases of PHASE_SECONDS each, the probe running
# through all of them:
#   quiet        no attack (the reference)
#   anon-flood   200 anonymous requests/s, GET /metrics and GET /v1/crl
#                alternating, over TLS without a client certificate
#   half-open    190 half-open connections on every listener: the API port
#                (nothing sent, or half a ClientHello), the --http-redirect
#                port and the agent's --health port (a request line and one
#                header, then nothing); each one the server closes is re-opened
#   streams      50 concurrent GET /v1/events from one workload certificate,
#                each refused one retrying every 250 ms
#   renew-flood  that workload renewing as fast as it can (loadgen, its own
#                certificate, POST /v1/sign, 8 connections)
# Prints the probe's p50/p99 and failures per phase, the p99 ratio to the quiet
# run, the attackers' own figures, the server's RSS and open fds. Targets: no
# failed request (probe, agent), p99 within 2x of the quiet run.
#
#   bench/abuse.sh                                # 200,000 records, 20 s phases
#   SEED=20000 PHASE_SECONDS=10 bench/abuse.sh    # a quick run
#   PHASES="quiet streams" bench/abuse.sh         # some phases only
#   LIMITS='issuances_per_minute = 60' bench/abuse.sh   # lines for meshca.toml's [limits]
#   BIN_DIR=target/debug bench/abuse.sh           # prebuilt binaries, no cargo build
#
# An attack that wins (a failed probe request, a failed or dead agent, a p99
# over 2x) prints TARGET MISSED and the run completes; `invalid run:` (exit 1)
# means the measurement itself broke (the server died, the probe got no
# answer at all, an attacker crashed or said nothing).
set -euo pipefail
cd "$(dirname "$0")/.."

PHASE="${PHASE_SECONDS:-20}"
SEED="${SEED:-200000}"
REVOKED="${REVOKED:-300}"
WARM="${WARMUP_SECONDS:-3}"      # an attack runs this long before the probe starts
SETTLE="${SETTLE_SECONDS:-3}"    # pause between phases
PHASES="${PHASES:-quiet anon-flood half-open streams renew-flood}"
AGENT_TTL="${AGENT_TTL:-30s}"
# The attacks' sizes, as the issue sets them.
ANON_RATE="${ANON_RATE:-200}"
HALF_OPEN="${HALF_OPEN:-190}"
STREAMS="${STREAMS:-50}"
STREAM_RETRY_MS="${STREAM_RETRY_MS:-250}"
RENEW_CONNECTIONS="${RENEW_CONNECTIONS:-8}"
LIMITS="${LIMITS:-}"
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release --quiet -p meshca --bin meshca
  cargo build --release --quiet -p meshca-client --example loadgen
  BIN_DIR=target/release
fi
M=$BIN_DIR/meshca
LOAD=$BIN_DIR/examples/loadgen
PY=(python3 bench/abuse.py)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# A run whose measurement broke measures nothing: it fails, saying so.
invalid() { echo "invalid run: $*" >&2; tail -n 20 "$work"/*.log >&2 || true; exit 1; }
TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo; } # user + system
cores() { # ticks_before ticks_after -> cores used over PHASE seconds
  awk -v a="$1" -v b="$2" -v t="$TICK" -v s="$PHASE" 'BEGIN {if (a == "" || b == "") print "?"; else printf "%.2f", (b - a) / t / s}'
}
field() { awk -v f="$1" '{for (i = 1; i < NF; i++) if ($i == f) {print $(i+1); exit}}' <<<"$2"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_until() { # what seconds command...
  local what=$1 secs=$2 tries=0; shift 2
  until "$@"; do
    tries=$((tries + 1)); [ "$tries" -lt $((secs * 10)) ] || invalid "$what not within ${secs}s"; sleep 0.1
  done
}

# --- the server, on free ports
D="$work/data"
A="$D/admin"
P=$(free_port); R=$(free_port); H=$(free_port)
$M init --dir "$D" >"$work/init.log" 2>&1 || invalid "meshca init failed"
if [ -n "$LIMITS" ]; then
  printf '\n[limits]\n%s\n' "$LIMITS" >> "$D/meshca.toml"
  limits_said="[limits] $(tr '\n' ';' <<<"$LIMITS" | sed 's/;$//'), the rest the server's defaults"
else
  limits_said="the server's defaults (no [limits] table)"
fi
$M serve --dir "$D" --listen "127.0.0.1:$P" --http-redirect "127.0.0.1:$R" 2>"$work/serve.log" &
SERVER=$!
pids+=($SERVER)
ready() { curl -sf --resolve "localhost:$P:127.0.0.1" --cacert "$A/ca.crt" "https://localhost:$P/readyz" >/dev/null; }
wait_until "meshca serve ready" 60 ready
ADMIN=(--ca "$A/ca.crt" --cert "$A/tls.crt" --key "$A/tls.key")

# --- SEED records: the admin (whom no issuance limit binds) over 32
# connections, in runs sized from the rate so far, a new identity per run.
seeded=0 run=0 secs=2
while [ "$seeded" -lt "$SEED" ]; do
  echo "{\"name\":\"seed-$run\"}" > "$work/seed.json"
  out=$($LOAD --url "https://localhost:$P/v1/issue" --body "$work/seed.json" "${ADMIN[@]}" \
        --connections 32 --seconds "$secs") || invalid "seeding: loadgen failed"
  ok=$(field ok "$out"); errors=$(field errors "$out")
  [ -n "$ok" ] && [ "$ok" != 0 ] && [ "$errors" = 0 ] || invalid "seeding: ${errors:-?} errors, ${ok:-?} answered: $out"
  seeded=$((seeded + ok)); run=$((run + 1))
  secs=$(awk -v left=$((SEED - seeded)) -v r="$(field rate "$out")" \
    'BEGIN {s = int(left / r) + 1; print (s < 1 ? 1 : (s > 60 ? 60 : s))}')
  echo "seeding: $seeded of $SEED records ($out)" >&2
done
"${PY[@]}" revoke --port "$P" "${ADMIN[@]}" --count "$REVOKED" >/dev/null || invalid "revoking $REVOKED certificates failed"
count=$("${PY[@]}" count --port "$P" --ca "$A/ca.crt" --timeout 300) || invalid "cannot read the store's size from /metrics"
records=${count%% *}
[ "$records" -ge "$SEED" ] || invalid "the store holds $records records, not $SEED: $count"

# --- identities: the well-behaved agent (renewing every ~2/3 of AGENT_TTL)
# and the noisy workload (one certificate, by `agent --once`).
export MESHCA_SERVER="https://localhost:$P" MESHCA_DIR="$D"
token() { # name -> "TOKEN FINGERPRINT"
  $M token create "$1" --json | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["token"], j["ca_fingerprint"])'
}
tk=$(token steady) || invalid "token create failed"
read -r TOKEN FP <<<"$tk"
$M agent steady --token "$TOKEN" --ca-fingerprint "$FP" --out "$work/steady" --ttl "$AGENT_TTL" \
  --health "127.0.0.1:$H" 2>"$work/agent.log" &
AGENT=$!
pids+=($AGENT)
agent_ok() { curl -sf -m 5 "http://127.0.0.1:$H/healthz" >/dev/null; }
wait_until "the agent's first certificate" 60 agent_ok
renewals() { curl -sf -m 5 "http://127.0.0.1:$H/metrics" | awk '$1 == "meshca_agent_renewals_total" {print $2}'; }
renewals_start=$(renewals) || invalid "the agent's /metrics did not answer"
agent_started=$SECONDS
tk=$(token noisy) || invalid "token create failed"
read -r TOKEN FP <<<"$tk"
$M agent noisy --token "$TOKEN" --ca-fingerprint "$FP" --out "$work/noisy" --once 2>"$work/noisy-once.log" \
  || invalid "no certificate for the noisy workload"
N=(--ca "$work/noisy/ca.crt" --cert "$work/noisy/tls.crt" --key "$work/noisy/tls.key")
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/noisy-csr.key" \
  -out "$work/noisy-csr.pem" -subj "/CN=noisy" 2>/dev/null
python3 -c 'import json,sys; print(json.dumps({"name": "noisy", "csr": open(sys.argv[1]).read()}))' \
  "$work/noisy-csr.pem" > "$work/noisy-sign.json"

echo "== abuse: store of $records records ($(cut -d' ' -f2- <<<"$count")) before the phases; ${PHASE}s phases;" \
  "probe: a new TLS connection + POST /v1/issue every 50 ms (admin certificate); agent --ttl $AGENT_TTL;" \
  "limits: $limits_said"

# --- the phases
quiet_p99=
agent_dead=
fail_missed=()  # what broke the "no failed request" target
p99_missed=()   # what broke the "p99 within 2x" target
for name in $PHASES; do
  attacker=
  case $name in
    quiet) ;;
    anon-flood)
      "${PY[@]}" anon --port "$P" --ca "$A/ca.crt" --rate "$ANON_RATE" >"$work/attack.out" 2>"$work/attack.log" &
      attacker=$! ;;
    half-open)
      "${PY[@]}" halfopen --targets "tls:$P" "http:$R" "http:$H" --per "$HALF_OPEN" >"$work/attack.out" 2>"$work/attack.log" &
      attacker=$! ;;
    streams)
      "${PY[@]}" streams --port "$P" "${N[@]}" --streams "$STREAMS" --retry-ms "$STREAM_RETRY_MS" >"$work/attack.out" 2>"$work/attack.log" &
      attacker=$! ;;
    renew-flood)
      $LOAD --url "https://localhost:$P/v1/sign" --body "$work/noisy-sign.json" "${N[@]}" \
        --connections "$RENEW_CONNECTIONS" --seconds $((WARM + PHASE + 1)) >"$work/attack.out" 2>"$work/attack.log" &
      attacker=$! ;;
    *) invalid "unknown phase $name (quiet anon-flood half-open streams renew-flood)" ;;
  esac
  if [ -n "$attacker" ]; then pids+=($attacker); sleep "$WARM"; fi
  r0=$(renewals) || r0=
  s0=$(cpu_ticks "$SERVER"); a0=
  [ -z "$attacker" ] || a0=$(cpu_ticks "$attacker")
  out=$("${PY[@]}" probe --port "$P" "${ADMIN[@]}" --seconds "$PHASE" --interval 0.05 \
        --agent-health "127.0.0.1:$H" 2>"$work/probe.log") || invalid "$name: the probe broke: $(tail -n 3 "$work/probe.log")"
  kill -0 "$SERVER" 2>/dev/null || invalid "the server died during $name"
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$SERVER/status")
  fds=$(find "/proc/$SERVER/fd" -mindepth 1 -maxdepth 1 | wc -l)
  # CPU over the probe's window, in cores: the server's, and the attacker's
  # (it shares the two cores).
  server_cpu=$(cores "$s0" "$(cpu_ticks "$SERVER")")
  attacker_cpu=
  [ -z "$attacker" ] || attacker_cpu=$(cores "$a0" "$(cpu_ticks "$attacker")")
  if [ -n "$attacker" ]; then
    case $name in
      renew-flood) wait "$attacker" || invalid "$name: the attacker (loadgen) failed: $(tail -n 3 "$work/attack.log")" ;;
      *) kill -TERM "$attacker" 2>/dev/null || true
         wait "$attacker" || invalid "$name: the attacker failed: $(tail -n 3 "$work/attack.log")" ;;
    esac
  fi
  # An agent that dies is the well-behaved client failing, not a broken run.
  if [ -z "$agent_dead" ] && ! kill -0 "$AGENT" 2>/dev/null; then
    why=$(grep -m 1 -E 'ERROR|panicked' "$work/agent.log" | sed 's/\x1b\[[0-9;]*m//g' || true)
    agent_dead=$name; fail_missed+=("the agent exited during $name${why:+: $why}")
  fi
  r1=$(renewals) || r1=
  ok=$(field ok "$out"); failed=$(field failed "$out"); p99=$(field p99_ms "$out")
  hfailed=$(field agent_health_failed "$out")
  [ -n "$ok" ] && [ "$ok" != 0 ] || invalid "$name: the probe got no answer at all: $out $(tail -n 3 "$work/probe.log")"
  [ "$failed" = 0 ] && [ "$hfailed" = 0 ] || fail_missed+=("$name: $failed failed requests, $hfailed failed agent health checks")
  ratio=
  if [ "$name" = quiet ] && [ -z "$quiet_p99" ]; then
    quiet_p99=$p99
  elif [ -n "$quiet_p99" ]; then
    ratio=$(awk -v a="$p99" -v q="$quiet_p99" 'BEGIN {printf "%.2f", a / q}')
    awk -v r="$ratio" 'BEGIN {exit !(r > 2)}' && p99_missed+=("$name: p99 ${ratio}x the quiet run's")
  fi
  line="phase $name p50_ms $(field p50_ms "$out") p99_ms $p99 ok $ok failed $failed"
  [ -z "$ratio" ] || line+=" ratio_p99 $ratio"
  echo "$line agent_health_failed $hfailed agent_renewals $([ -n "$r0" ] && [ -n "$r1" ] && echo "+$((r1 - r0))" || echo "?") server_rss_kib $rss server_fds $fds server_cores $server_cpu"
  [ ! -s "$work/probe.log" ] || sed 's/^/    /' "$work/probe.log"
  if [ -n "$attacker" ]; then
    a=$(cat "$work/attack.out")
    if [ "$name" = renew-flood ]; then
      # loadgen counts only 2xx as ok: the rest are refusals (429) or failures.
      a="attacker renew-flood certificates $(field ok "$a") refused_or_failed $(field errors "$a") ($a)"
    fi
    [ -n "$a" ] || invalid "$name: the attacker said nothing: $(tail -n 3 "$work/attack.log")"
    echo "    $a (attacker cores $attacker_cpu)"
  fi
  sleep "$SETTLE"
done

# --- the agent, at the end: alive, healthy, renewed as often as its lifetime asks
kill -0 "$SERVER" 2>/dev/null || invalid "the server died"
ran=$((SECONDS - agent_started))
renewals_end=$(renewals) || renewals_end=$renewals_start
renewed=$((renewals_end - renewals_start))
agent_errors=$(grep -c ERROR "$work/agent.log" || true)
expected=$(awk -v t="$AGENT_TTL" -v s="$ran" 'BEGIN {
  n = t + 0; u = substr(t, length(t)); if (u == "m") n *= 60; if (u == "h") n *= 3600;
  print int(s / (n * 2 / 3 * 1.1)) }')
agent_said="agent: renewed $renewed times in ${ran}s (about $expected expected), $agent_errors errors logged"
if [ -z "$agent_dead" ] && ! kill -0 "$AGENT" 2>/dev/null; then
  agent_dead=end; fail_missed+=("the agent exited after the last phase")
fi
if ! agent_ok; then
  fail_missed+=("the agent's /healthz is not 200 at the end")
fi
if [ "$renewed" -lt $((expected - 1)) ] || { [ "$expected" -ge 1 ] && [ "$renewed" -lt 1 ]; }; then
  fail_missed+=("the agent renewed $renewed times in ${ran}s (about $expected expected)")
fi
if [ "$agent_errors" != 0 ]; then
  fail_missed+=("the agent logged errors: $(grep -m 2 ERROR "$work/agent.log" | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ')")
fi
echo "== $agent_said"

if [ "${#fail_missed[@]}" = 0 ]; then
  echo "== target \"no failed request\": met (every phase: 0 failed probe requests, 0 failed agent health checks; the agent healthy and renewing)"
else
  echo "== target \"no failed request\": TARGET MISSED ($(printf '%s; ' "${fail_missed[@]}" | sed 's/; $//'))"
fi
if [ -z "$quiet_p99" ]; then
  echo "== target \"p99 within 2x of the quiet run\": not measured (no quiet phase in PHASES)"
elif [ "${#p99_missed[@]}" = 0 ]; then
  echo "== target \"p99 within 2x of the quiet run\": met (quiet p99 ${quiet_p99} ms)"
else
  echo "== target \"p99 within 2x of the quiet run\": TARGET MISSED (quiet p99 ${quiet_p99} ms; $(printf '%s; ' "${p99_missed[@]}" | sed 's/; $//'))"
fi
