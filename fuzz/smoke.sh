#!/usr/bin/env bash
# Builds every fuzz target and runs each for a short smoke period.
#   fuzz/smoke.sh                      # 20 s per target (the test command runs this)
#   FUZZ_SECONDS=600 fuzz/smoke.sh     # longer, on demand
#   RUSTC_BOOTSTRAP=1 cargo fuzz run csr   # one target, until stopped
# Inputs that once found a bug go to regressions/<target>/ and are replayed
# on every run. Seeds are generated here by openssl, not committed.
set -euo pipefail
cd "$(dirname "$0")"
SECS="${FUZZ_SECONDS:-20}"
TARGETS=(csr certs duration identity api config sniff journal)
if [ "$SECS" = 0 ]; then
  # libFuzzer reads -max_total_time=0 as "no limit": 0 means no fuzzing.
  echo "fuzz: ***** FUZZING SKIPPED (FUZZ_SECONDS=0): no target ran *****"
  exit 0
fi

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
# cargo-fuzz passes sanitizer flags that rustc gates behind nightly; the one
# toolchain here is stable, which accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
cargo fuzz build --dev

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
for t in "${TARGETS[@]}"; do mkdir -p "$seeds/$t" "regressions/$t"; done
for alg in "ec -pkeyopt ec_paramgen_curve:P-256" "ec -pkeyopt ec_paramgen_curve:P-384" "ed25519" "rsa:2048"; do
  name=$(echo "$alg" | tr -c 'a-z0-9' '_')
  # shellcheck disable=SC2086
  openssl req -new -newkey $alg -nodes -keyout /dev/null -subj "/CN=seed" \
    -addext "subjectAltName=DNS:seed.example.com,URI:spiffe://cluster.local/ns/a/sa/b" \
    -out "$seeds/csr/$name.pem" 2>/dev/null
  openssl req -in "$seeds/csr/$name.pem" -outform DER -out "$seeds/csr/$name.der"
  # shellcheck disable=SC2086
  openssl req -x509 -new -newkey $alg -nodes -keyout /dev/null -subj "/CN=seed" -days 1 \
    -addext "subjectAltName=DNS:seed.example.com,IP:10.0.0.1" -out "$seeds/certs/$name.pem" 2>/dev/null
  openssl x509 -in "$seeds/certs/$name.pem" -outform DER -out "$seeds/certs/$name.der"
done
cat "$seeds"/certs/*.pem > "$seeds/certs/bundle.pem"
for d in 1h30m 1.5h 90s 300ms 87600h 2h45m10.5s 0 1us; do printf '%s' "$d" > "$seeds/duration/$d"; done
# identity: namespace \001 name \001 extra DNS SAN
i=0
for s in 'default\001web\001web.example.com' 'kube-system\001api-server\001a.b-c.d' 'cluster.local' 'shop\001cart\001*.shop.example.com'; do
  printf "$s" > "$seeds/identity/$i"; i=$((i + 1))
done

python3 seeds.py "$seeds"

for t in "${TARGETS[@]}"; do
  echo "fuzz: $t for ${SECS}s"
  if ! cargo fuzz run --dev "$t" "$seeds/$t" "regressions/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      >"$seeds/$t.log" 2>&1; then
    tail -60 "$seeds/$t.log"
    echo "fuzz: $t found a failure; the input is in fuzz/artifacts/$t (add it to fuzz/regressions/$t once fixed)"
    exit 1
  fi
  grep -E '^Done|number_of_executed_units' "$seeds/$t.log"
  # A run that tried nothing is no evidence: libFuzzer that could not start
  # the target, or stopped before its first inputs. (The floor is low: the
  # journal target opens a store per input, about 5 a second on a loaded
  # 2-core machine.)
  runs=$(awk '/^stat::number_of_executed_units/ {print $NF}' "$seeds/$t.log" | tail -1)
  if [ -z "$runs" ] || [ "$runs" -lt 20 ]; then
    tail -30 "$seeds/$t.log"
    echo "fuzz: $t: invalid run: ${runs:-no} inputs executed in ${SECS}s"
    exit 1
  fi
done
