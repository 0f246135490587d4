#!/usr/bin/env bash
# Leaf certificates signed per second on one core, against the machine's own
# crypto limit as `openssl speed` measures it, in one run.
#
#   bench/pki.sh            # 3 rounds of 2 s per figure (medians)
#   ROUNDS=5 SECONDS_PER_ROUND=3 bench/pki.sh
#
# Limits: a certificate from a CSR costs one signature verification (the CSR)
# and one signature (the leaf): limit = 1 / (1/verify + 1/sign). A certificate
# with a CA-generated key costs one key generation and one signature; a key
# generation is one fixed-base scalar multiplication, the same work as a
# signature, so limit = sign / 2.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_ROUND:-2}"
CORE="${BENCH_CORE:-0}"
pin() { if command -v taskset >/dev/null; then taskset -c "$CORE" "$@"; else "$@"; fi; }
# A run with errors measures nothing: it fails, saying so.
invalid() { echo "invalid run: $*" >&2; exit 1; }
positive() { awk -v x="$1" 'BEGIN {exit !(x + 0 > 0)}'; }

cargo build --release --quiet -p meshca-pki --example pki_bench
bench_bin=target/release/examples/pki_bench

echo "== openssl speed (one core, $SECS s per op, median of $ROUNDS)"
declare -A SIGN VERIFY
for alg in ecdsap256 ed25519; do
  signs=(); verifies=()
  for _ in $(seq "$ROUNDS"); do
    line=$(pin openssl speed -seconds "$SECS" "$alg" 2>/dev/null | grep -E 'nistp256|Ed25519' | tail -1) \
      || invalid "openssl speed $alg failed"
    sign=$(awk '{print $(NF-1)}' <<<"$line"); verify=$(awk '{print $NF}' <<<"$line")
    { positive "$sign" && positive "$verify"; } || invalid "openssl speed $alg: no rates in: $line"
    signs+=("$sign"); verifies+=("$verify")
  done
  SIGN[$alg]=$(printf '%s\n' "${signs[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  VERIFY[$alg]=$(printf '%s\n' "${verifies[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '  %-10s sign %10.0f/s   verify %10.0f/s\n' "$alg" "${SIGN[$alg]}" "${VERIFY[$alg]}"
done

echo "== meshca-pki (one core)"
declare -A RATE
# pki_bench stops at the first error (a CSR that does not parse, a leaf that
# is not signed): its exit status is read, not lost in a process substitution.
rates=$(ROUNDS="$ROUNDS" BENCH_SECONDS="$SECS" pin "$bench_bin") || invalid "pki_bench failed"
while read -r name rate; do
  RATE[$name]=$rate
done <<<"$rates"
for name in csr_p256 gen_p256 csr_ed25519 gen_ed25519; do
  positive "${RATE[$name]:-}" || invalid "pki_bench gave no rate for $name: $rates"
done

report() { # name alg kind
  local name=$1 alg=$2 kind=$3 limit
  if [ "$kind" = csr ]; then
    limit=$(awk -v s="${SIGN[$alg]}" -v v="${VERIFY[$alg]}" 'BEGIN {print 1/(1/s + 1/v)}')
  else
    limit=$(awk -v s="${SIGN[$alg]}" 'BEGIN {print s/2}')
  fi
  awk -v n="$name" -v r="${RATE[$name]}" -v l="$limit" \
    'BEGIN {printf "  %-12s %9.0f certs/s   limit %9.0f/s   ratio %5.0f%%\n", n, r, l, 100*r/l}'
}
report csr_p256 ecdsap256 csr
report gen_p256 ecdsap256 gen
report csr_ed25519 ed25519 csr
report gen_ed25519 ed25519 gen
echo "(target: at least 60% of the limit)"
