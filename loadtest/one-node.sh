# shellcheck shell=bash disable=SC2034  # what it sets is for the benchmark that sources it
# Sourced by the one-node benchmarks (api-bench.sh, sse-bench.sh) with their arguments: a
# private redis-server (unless --no-redis) and release gateway nodes on free loopback ports,
# all stopped however the benchmark ends.
#
# Sets root, gateway, loadgen, work (a scratch directory), redis (1, or 0 with --no-redis),
# redis_pid (empty without Redis) and node_port; start_node [NAME=VALUE...] starts a node with
# that environment on node_port and waits until it is ready (its pid in $node); stop_node stops
# it; describe prints the setup's heading line.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gateway=${GATEWAY_BIN:-$root/target/release/chat-gateway}
loadgen=${LOADGEN_BIN:-$root/target/release/chat-loadgen}
redis=1
[ "${1:-}" = "--no-redis" ] && redis=0
export PATH="$PATH:/usr/sbin"

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

read -r redis_port node_port < <(python3 "$root/scripts/free-ports.py" 2)
broker=()
redis_pid=""
if [ "$redis" = 1 ]; then
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  broker=(--redis-url "redis://127.0.0.1:$redis_port")
fi

node=""
start_node() {
  env "$@" RUST_LOG=warn "$gateway" --listen "127.0.0.1:$node_port" --node-id bench \
    "${broker[@]}" >"$work/node.log" 2>&1 &
  node=$!
  pids+=("$node")
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$node_port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the node did not get ready (log: $work/node.log)" >&2
  return 1
}

stop_node() {
  kill "$node"
  wait "$node" 2>/dev/null || true
}

describe() {
  echo "# one node, $([ "$redis" = 1 ] && echo "on its own redis-server" || echo "in-process broker")"
}
