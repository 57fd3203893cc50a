#!/bin/sh
# Container entrypoint for chat-gateway.
# Without an explicit GATEWAY_NODE_ID the node is named after the container's
# hostname (the container ID under Docker, the pod name under Kubernetes):
# unique per replica, stable across restarts of the same container, and the
# same name `docker ps` / `docker logs` show.
set -eu
if [ -z "${GATEWAY_NODE_ID:-}" ]; then
    GATEWAY_NODE_ID=$(cat /proc/sys/kernel/hostname)
    export GATEWAY_NODE_ID
fi
exec /usr/local/bin/chat-gateway "$@"
