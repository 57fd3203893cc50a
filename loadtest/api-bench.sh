#!/usr/bin/env bash
# The server API on one node: starts a private redis-server (unless --no-redis) and one release
# gateway node with an API key on free loopback ports, then runs `chat-loadgen api` twice:
# callers publishing as fast as they are answered (throughput), then at a fixed rate well below
# it (latency from a publish to the room's WebSocket members). Stops what it started however
# it ends. docs/benchmarks.md (f) was measured with it.
#
#   cargo build --release -p gateway -p chat-loadgen
#   loadtest/api-bench.sh [--no-redis]
#
# API_BENCH_DURATION (default 10s), API_BENCH_CALLERS (8), API_BENCH_MEMBERS (10) and
# API_BENCH_RATE (the paced run's publishes/s, default 500) change the runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
gateway=${GATEWAY_BIN:-$root/target/release/chat-gateway}
loadgen=${LOADGEN_BIN:-$root/target/release/chat-loadgen}
duration=${API_BENCH_DURATION:-10s}
callers=${API_BENCH_CALLERS:-8}
members=${API_BENCH_MEMBERS:-10}
rate=${API_BENCH_RATE:-500}
redis=1
[ "${1:-}" = "--no-redis" ] && redis=0
export PATH="$PATH:/usr/sbin"

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

read -r redis_port node_port < <(python3 "$root/scripts/free-ports.py" 2)
broker=()
watch=()
if [ "$redis" = 1 ]; then
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
  pids+=($!)
  watch+=("redis=$!")
  broker=(--redis-url "redis://127.0.0.1:$redis_port")
fi
key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
GATEWAY_API_KEY=$key RUST_LOG=warn "$gateway" --listen "127.0.0.1:$node_port" --node-id bench \
  "${broker[@]}" >"$work/node.log" 2>&1 &
pids+=($!)
watch+=("node=$!")
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$node_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

run() {
  LOADGEN_API_KEY=$key "$loadgen" api --url "ws://127.0.0.1:$node_port/ws" \
    --members "$members" --duration "$duration" --quiet \
    --pid "$(IFS=,; echo "${watch[*]}")" "$@"
}
echo "# one node, $([ "$redis" = 1 ] && echo "on its own redis-server" || echo "in-process broker")"
run --callers "$callers"
run --callers 4 --rate "$rate"
