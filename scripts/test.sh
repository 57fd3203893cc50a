#!/usr/bin/env bash
# Runs every test on a fresh machine: installs the system packages the tests start as real
# processes (redis-server, nginx, prometheus, ...) when they are missing, then runs the suite.
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
  [docker-compose]=docker-compose
  [curl]=curl
  [python3]=python3
)
missing=()
for program in "${!needed[@]}"; do
  command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || missing+=("${needed[$program]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "==> installing ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# Debian starts the packaged services on install; the tests run their own on free ports and
# never touch these, so they are left as they are.
export PATH="$PATH:/usr/sbin"

echo "==> cargo test --workspace"
cargo test --workspace --locked
