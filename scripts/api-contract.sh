#!/usr/bin/env bash
# The server API against its own description: starts a private redis-server and one gateway
# node with an API key on free loopback ports, then lets schemathesis generate requests from
# the OpenAPI document the node serves (/api/openapi.json), valid and invalid ones, and check
# every answer: no 5xx, every status, content type, header and body as the document says,
# invalid input refused, calls without the key refused. Used by scripts/test.sh; bounded in
# examples per operation and in time; stops what it started however it ends.
#
#   scripts/api-contract.sh [path/to/chat-gateway]
#
# API_CONTRACT_EXAMPLES sets the examples per operation (default 100).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
gateway=${1:-${GATEWAY_BIN:-$root/target/debug/chat-gateway}}
examples=${API_CONTRACT_EXAMPLES:-100}
export PATH="$PATH:/usr/sbin"

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

read -r redis_port node_port < <(python3 "$root/scripts/free-ports.py" 2)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)

key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
GATEWAY_API_KEY=$key RUST_LOG=warn "$gateway" --listen "127.0.0.1:$node_port" \
  --node-id contract --redis-url "redis://127.0.0.1:$redis_port" >"$work/node.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$node_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
if ! curl -fsS "http://127.0.0.1:$node_port/readyz" >/dev/null 2>&1; then
  echo "the node did not become ready; its log:" >&2
  cat "$work/node.log" >&2
  exit 1
fi

# Every check but those for stateful APIs (resources created and deleted: this API has none)
# and positive_data_acceptance: chat text is bounded in UTF-8 bytes, which JSON Schema cannot
# say (its maxLength counts characters), so a long text of multi-byte characters that fits
# the schema is rightly refused.
checks=not_a_server_error,status_code_conformance,content_type_conformance
checks+=,response_headers_conformance,response_schema_conformance,negative_data_rejection
checks+=,missing_required_header,unsupported_method,allow_header_conformance,ignored_auth

# Run from the scratch directory: hypothesis keeps a cache in the working directory.
status=0
(
  cd "$work"
  timeout 300 schemathesis run "http://127.0.0.1:$node_port/api/openapi.json" \
    --header "Authorization: Bearer $key" \
    --checks "$checks" \
    --max-examples "$examples" \
    --request-timeout 10 \
    --generation-database none \
    --no-color
) || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- the node's log ---" >&2
  tail -n 50 "$work/node.log" >&2
fi
exit "$status"
