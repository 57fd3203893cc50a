#!/bin/bash
# Docker HEALTHCHECK for chat-gateway: GET /healthz must answer 200.
# Uses bash's /dev/tcp so the runtime image needs no curl/wget.
# The port follows GATEWAY_LISTEN (default 0.0.0.0:8080).
set -eu
port=${GATEWAY_LISTEN:-0.0.0.0:8080}
port=${port##*:}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
IFS= read -r -t 2 status <&3
case "$status" in
    "HTTP/1."[01]" 200"*) exit 0 ;;
    *) echo "healthz: ${status:-no answer}" >&2; exit 1 ;;
esac
