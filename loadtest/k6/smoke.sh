#!/usr/bin/env bash
# A short k6 fan-out run through nginx against the native cluster, on free loopback ports, that
# must pass the scenario's thresholds. Used by scripts/test.sh; stops the cluster however it ends.
#
#   loadtest/k6/smoke.sh [path/to/chat-gateway]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export GATEWAY_BIN=${1:-${GATEWAY_BIN:-$root/target/debug/chat-gateway}}

free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
PY
}
read -r https http internal redis node1 node2 node3 int1 int2 int3 < <(free_ports 10)
CLUSTER_DIR=$(mktemp -d)
export CLUSTER_DIR CLUSTER_HTTPS_PORT=$https CLUSTER_HTTP_PORT=$http CLUSTER_INTERNAL_PORT=$internal
export CLUSTER_REDIS_PORT=$redis CLUSTER_PROMETHEUS=0
export CLUSTER_NODE_PORTS="$node1 $node2 $node3" CLUSTER_NODE_INTERNAL_PORTS="$int1 $int2 $int3"
trap '"$root/deploy/local/cluster.sh" down >/dev/null 2>&1 || true; rm -rf "$CLUSTER_DIR"' EXIT

"$root/deploy/local/cluster.sh" up
# Through nginx's TLS entry, trusting the cluster's self-signed certificate (Go, and so k6,
# reads its trusted roots from SSL_CERT_FILE).
SSL_CERT_FILE="$CLUSTER_DIR/tls/tls.crt" k6 run --quiet \
  -e TARGET="wss://127.0.0.1:$https/ws" -e VUS=60 -e ROOMS=3 -e RATE=5 \
  -e DURATION=10s -e WARMUP=3s -e DRAIN=3s \
  "$root/loadtest/k6/fanout.js"
