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
# shellcheck source=loadtest/one-node.sh
. "$(dirname "$0")/one-node.sh"
idle=${SSE_BENCH_IDLE:-2000}
rate=${SSE_BENCH_RATE:-200}
duration=${SSE_BENCH_DURATION:-10s}
limits_off=(GATEWAY_CONN_MESSAGE_RATE=0 GATEWAY_USER_MESSAGE_RATE=0 GATEWAY_IP_CONNECT_RATE=0)

describe
for transport in websocket sse; do
  start_node "${limits_off[@]}"
  "$loadgen" sse --url "http://127.0.0.1:$node_port" --pid "$node" --idle "$idle" \
    --transport "$transport"
  stop_node
done
start_node "${limits_off[@]}"
"$loadgen" sse --url "http://127.0.0.1:$node_port" --rate "$rate" --duration "$duration"
