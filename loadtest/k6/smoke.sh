#!/usr/bin/env bash
# A short k6 fan-out run through nginx against the native cluster, on free loopback ports, that
# must pass the scenario's thresholds. Used by scripts/test.sh; stops the cluster however it ends.
#
#   loadtest/k6/smoke.sh [path/to/chat-gateway]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export GATEWAY_BIN=${1:-${GATEWAY_BIN:-$root/target/debug/chat-gateway}}

read -r http redis node1 node2 node3 < <(python3 "$root/scripts/free-ports.py" 5)
CLUSTER_DIR=$(mktemp -d)
export CLUSTER_DIR CLUSTER_HTTP_PORT=$http CLUSTER_REDIS_PORT=$redis CLUSTER_PROMETHEUS=0
export CLUSTER_NODE_PORTS="$node1 $node2 $node3"
trap '"$root/deploy/local/cluster.sh" down >/dev/null 2>&1 || true; rm -rf "$CLUSTER_DIR"' EXIT

"$root/deploy/local/cluster.sh" up
k6 run --quiet \
  -e TARGET="ws://127.0.0.1:$http/ws" -e VUS=60 -e ROOMS=3 -e RATE=5 \
  -e DURATION=10s -e WARMUP=3s -e DRAIN=3s \
  "$root/loadtest/k6/fanout.js"
