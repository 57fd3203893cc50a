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
# shellcheck source=loadtest/one-node.sh
. "$(dirname "$0")/one-node.sh"
duration=${API_BENCH_DURATION:-10s}
callers=${API_BENCH_CALLERS:-8}
members=${API_BENCH_MEMBERS:-10}
rate=${API_BENCH_RATE:-500}

key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
start_node GATEWAY_API_KEY="$key"
watch=("node=$node")
[ -n "$redis_pid" ] && watch+=("redis=$redis_pid")

run() {
  LOADGEN_API_KEY=$key "$loadgen" api --url "ws://127.0.0.1:$node_port/ws" \
    --members "$members" --duration "$duration" --quiet \
    --pid "$(IFS=,; echo "${watch[*]}")" "$@"
}
describe
run --callers "$callers"
run --callers 4 --rate "$rate"
