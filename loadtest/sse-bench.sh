#!/usr/bin/env bash
# The SSE fallback next to WebSockets on one node: starts a private redis-server (unless
# --no-redis) and a release gateway node on free loopback ports, then runs `chat-loadgen sse`:
# N idle WebSockets on a fresh node, N idle SSE streams on another fresh node (RSS growth per
# connection; fresh so neither reuses memory the other freed), then one room's messages at a
# moderate rate to a WebSocket member and an SSE member (latency p50/p99). Stops what it
# started however it ends. docs/benchmarks.md (g) was measured with it.
#
#   cargo build --release -p gateway -p chat-loadgen
#   loadtest/sse-bench.sh [--no-redis]
#
# SSE_BENCH_IDLE (connections per transport, default 2000), SSE_BENCH_RATE (messages/s, 200)
# and SSE_BENCH_DURATION (10s) change the runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
gateway=${GATEWAY_BIN:-$root/target/release/chat-gateway}
loadgen=${LOADGEN_BIN:-$root/target/release/chat-loadgen}
idle=${SSE_BENCH_IDLE:-2000}
rate=${SSE_BENCH_RATE:-200}
duration=${SSE_BENCH_DURATION:-10s}
redis=1
[ "${1:-}" = "--no-redis" ] && redis=0
export PATH="$PATH:/usr/sbin"

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

read -r redis_port node_port < <(python3 "$root/scripts/free-ports.py" 2)
broker=()
if [ "$redis" = 1 ]; then
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
  pids+=($!)
  broker=(--redis-url "redis://127.0.0.1:$redis_port")
fi

node=""
start_node() {
  GATEWAY_CONN_MESSAGE_RATE=0 GATEWAY_USER_MESSAGE_RATE=0 GATEWAY_IP_CONNECT_RATE=0 \
    RUST_LOG=warn "$gateway" --listen "127.0.0.1:$node_port" --node-id bench \
    "${broker[@]}" >"$work/node.log" 2>&1 &
  node=$!
  pids+=("$node")
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$node_port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the node did not get ready" >&2
  return 1
}
stop_node() {
  kill "$node"
  wait "$node" 2>/dev/null || true
}

echo "# one node, $([ "$redis" = 1 ] && echo "on its own redis-server" || echo "in-process broker")"
for transport in websocket sse; do
  start_node
  "$loadgen" sse --url "http://127.0.0.1:$node_port" --pid "$node" --idle "$idle" \
    --transport "$transport"
  stop_node
done
start_node
"$loadgen" sse --url "http://127.0.0.1:$node_port" --rate "$rate" --duration "$duration"
