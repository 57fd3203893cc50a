#!/usr/bin/env bash
# Benchmark the chat gateway against the two Node.js reference peers with the same scenarios.
#
# Each stack (gateway, ws-peer, socketio) runs as a 2-node cluster on loopback ports sharing one
# fresh redis-server of its own (never the machine's 6379). Every scenario gets freshly started
# nodes and a fresh Redis, so memory and CPU readings are not polluted by the previous one.
# chat-loadgen reads utime+stime (/proc/<pid>/stat) and VmRSS of both nodes and of Redis before
# and after every step, and its own CPU; the results land in OUT as JSON lines plus a summary.
#
# Scenarios:
#   fanout   1,000 clients in 10 rooms (each room split across both nodes), 1 sender per room,
#            64-byte messages, 10 → 400 msg/s per sender
#   memory   10,000 and 20,000 idle connections: RSS per connection
#   bigroom  one room of 2,000 members split across both nodes, 1 sender at 20 msg/s
#   storm    10,000 connections opened as fast as 1,000 handshakes in flight allow: accepted/s
#   publish  500 rooms of 2 members, 1 sender each at 20 msg/s (10k messages/s): Redis CPU per
#            published message; the gateway also with a cid in every message (dedup)
#
# Usage: loadtest/bench.sh [--stacks gateway,ws-peer,socketio] [--scenarios fanout,memory,bigroom,storm]
#                          [--quick] [--out DIR]
# Environment:
#   GATEWAY_BIN   gateway binary (default: target/release/chat-gateway)
#   LOADGEN_BIN   load generator (default: $CARGO_TARGET_DIR or target, release/chat-loadgen;
#                 built with `cargo build --release -p chat-loadgen` when missing)
#   REDIS_PORT    port of the benchmark's own redis-server (default 6395)
#   NODE_PORTS    the two node ports (default 18081,18082)
#   GATEWAY_RUST_LOG  RUST_LOG for the gateway nodes (default warn)
#   GATEWAY_CONN_MESSAGE_RATE, GATEWAY_USER_MESSAGE_RATE, GATEWAY_IP_CONNECT_RATE
#                 gateway rate limits, 0 (off) by default here since the peers have none;
#                 any other GATEWAY_* variable set by the caller reaches the gateway too
#   STEP_DURATION sending time per fan-out step (default 10s)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOADTEST="$REPO/loadtest"

STACKS="gateway,ws-peer,socketio"
SCENARIOS="fanout,memory,bigroom,storm"
QUICK=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stacks) STACKS="$2"; shift 2 ;;
    --scenarios) SCENARIOS="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

GATEWAY_BIN="${GATEWAY_BIN:-$REPO/target/release/chat-gateway}"
LOADGEN_BIN="${LOADGEN_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/chat-loadgen}"
REDIS_PORT="${REDIS_PORT:-6395}"
NODE_PORTS="${NODE_PORTS:-18081,18082}"
PORT_A="${NODE_PORTS%%,*}"
PORT_B="${NODE_PORTS##*,}"
STEP_DURATION="${STEP_DURATION:-10s}"
OUT="${OUT:-$LOADTEST/results/$(date -u +%Y%m%dT%H%M%SZ)}"
LOGS="$OUT/logs"
RESULTS="$OUT/results.jsonl"

if [[ "$REDIS_PORT" == 6379 ]]; then
  echo "refusing to use port 6379: it may belong to another Redis on this machine" >&2
  exit 2
fi

# Scenario sizes (the --quick variant only checks that everything runs end to end).
if [[ $QUICK == 1 ]]; then
  FANOUT_CLIENTS=200; FANOUT_RATES=10,50; STEP_DURATION=3s
  MEMORY_COUNTS="1000 2000"; BIGROOM_CLIENTS=300; BIGROOM_DURATION=5s
  STORM_CONNECTIONS=2000; HOLD=3s; PUBLISH_CLIENTS=200
else
  FANOUT_CLIENTS=1000; FANOUT_RATES=10,50,100,200,400
  MEMORY_COUNTS="10000 20000"; BIGROOM_CLIENTS=2000; BIGROOM_DURATION=20s
  STORM_CONNECTIONS=10000; HOLD=10s; PUBLISH_CLIENTS=1000
fi

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- preconditions ---------------------------------------------------------------------------

command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl not found" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }

if [[ ! -x "$LOADGEN_BIN" ]]; then
  log "building chat-loadgen"
  (cd "$REPO" && cargo build --release -p chat-loadgen)
fi

IFS=, read -r -a STACK_LIST <<<"$STACKS"
IFS=, read -r -a SCENARIO_LIST <<<"$SCENARIOS"

for stack in "${STACK_LIST[@]}"; do
  case "$stack" in
    gateway)
      [[ -x "$GATEWAY_BIN" ]] || { echo "gateway binary not found at $GATEWAY_BIN (cargo build --release -p gateway, or set GATEWAY_BIN)" >&2; exit 1; } ;;
    ws-peer|socketio)
      command -v node >/dev/null || { echo "node not found" >&2; exit 1; }
      dir="$LOADTEST/peers/$([[ $stack == ws-peer ]] && echo ws-ioredis || echo socketio)"
      if [[ ! -d "$dir/node_modules" ]]; then
        log "installing $dir dependencies (npm ci)"
        (cd "$dir" && npm ci --no-audit --no-fund >/dev/null)
      fi ;;
    *) echo "unknown stack: $stack" >&2; exit 2 ;;
  esac
done

port_free() { ! ss -Htln "sport = :$1" | grep -q .; }
for p in "$REDIS_PORT" "$PORT_A" "$PORT_B"; do
  port_free "$p" || { echo "port $p is in use; set REDIS_PORT / NODE_PORTS" >&2; exit 1; }
done

# Servers and the load generator need many descriptors: raise the limit for every child.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

mkdir -p "$LOGS"
: >"$RESULTS"

# --- process management ----------------------------------------------------------------------

REDIS_PID=""
NODE_A_PID=""
NODE_B_PID=""

stop_pid() {
  local pid="$1"
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

stop_cluster() {
  stop_pid "$NODE_A_PID"; NODE_A_PID=""
  stop_pid "$NODE_B_PID"; NODE_B_PID=""
  stop_pid "$REDIS_PID"; REDIS_PID=""
}
trap stop_cluster EXIT
trap 'exit 130' INT TERM

wait_ready() {
  local port="$1" name="$2"
  for _ in $(seq 200); do
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" == 200 ]]; then
      return 0
    fi
    sleep 0.1
  done
  echo "$name on port $port did not become ready; see $LOGS" >&2
  return 1
}

# start_node STACK NODE_ID PORT LOGFILE: starts one node in the background, prints its pid.
start_node() {
  local stack="$1" id="$2" port="$3" logfile="$4"
  local redis_url="redis://127.0.0.1:$REDIS_PORT"
  case "$stack" in
    gateway)
      # The peers have no rate limits; lift the gateway's (per-connection and per-user message
      # rates, per-address connect rate) unless the caller set them. Environment variables, so a
      # gateway build without these settings simply ignores them.
      GATEWAY_CONN_MESSAGE_RATE="${GATEWAY_CONN_MESSAGE_RATE:-0}" \
        GATEWAY_USER_MESSAGE_RATE="${GATEWAY_USER_MESSAGE_RATE:-0}" \
        GATEWAY_IP_CONNECT_RATE="${GATEWAY_IP_CONNECT_RATE:-0}" \
        RUST_LOG="${GATEWAY_RUST_LOG:-warn}" "$GATEWAY_BIN" --redis-url "$redis_url" \
        --listen "127.0.0.1:$port" --node-id "$id" >"$logfile" 2>&1 &
      ;;
    ws-peer)
      PORT="$port" HOST=127.0.0.1 REDIS_URL="$redis_url" NODE_ID="$id" \
        node "$LOADTEST/peers/ws-ioredis/server.js" >"$logfile" 2>&1 &
      ;;
    socketio)
      PORT="$port" HOST=127.0.0.1 REDIS_URL="$redis_url" NODE_ID="$id" \
        node "$LOADTEST/peers/socketio/server.js" >"$logfile" 2>&1 &
      ;;
  esac
  echo $!
}

# start_cluster STACK TAG: fresh redis + two nodes named <stack>-a / <stack>-b.
start_cluster() {
  local stack="$1" tag="$2"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --maxclients 10000 --logfile "$LOGS/$tag-redis.log" &
  REDIS_PID=$!
  for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.05
  done
  NODE_A_PID="$(start_node "$stack" "$stack-a" "$PORT_A" "$LOGS/$tag-$stack-a.log")"
  NODE_B_PID="$(start_node "$stack" "$stack-b" "$PORT_B" "$LOGS/$tag-$stack-b.log")"
  wait_ready "$PORT_A" "$stack-a"
  wait_ready "$PORT_B" "$stack-b"
}

urls_for() {
  case "$1" in
    socketio) echo "ws://127.0.0.1:$PORT_A,ws://127.0.0.1:$PORT_B" ;;
    *) echo "ws://127.0.0.1:$PORT_A/ws,ws://127.0.0.1:$PORT_B/ws" ;;
  esac
}

# run_loadgen STACK SCENARIO_LABEL ARGS...: runs chat-loadgen against the running cluster and
# appends its JSON reports, tagged with stack and scenario, to results.jsonl.
run_loadgen() {
  local stack="$1" label="$2"
  shift 2
  local protocol="$stack"
  local pids="$stack-a=$NODE_A_PID,$stack-b=$NODE_B_PID,redis=$REDIS_PID"
  log "$stack: $label: chat-loadgen $*"
  "$LOADGEN_BIN" "$@" --protocol "$protocol" --url "$(urls_for "$stack")" --pid "$pids" \
    --json --quiet >"$OUT/$label-$stack.jsonl" 2>"$LOGS/$label-$stack.loadgen.log" || {
    log "$stack: $label: chat-loadgen failed (see $LOGS/$label-$stack.loadgen.log)"
    return 0
  }
  python3 - "$stack" "$label" "$OUT/$label-$stack.jsonl" >>"$RESULTS" <<'PY'
import json, sys
stack, label, path = sys.argv[1:4]
for line in open(path):
    line = line.strip()
    if line:
        r = json.loads(line)
        r["stack"] = stack
        r["bench"] = label
        print(json.dumps(r))
PY
}

# --- scenarios -------------------------------------------------------------------------------

scenario_fanout() {
  local stack="$1"
  start_cluster "$stack" fanout
  run_loadgen "$stack" fanout fanout --clients "$FANOUT_CLIENTS" --rooms 10 --senders 1 \
    --rates "$FANOUT_RATES" --size 64 --duration "$STEP_DURATION" --drain 3s --settle 2s
  stop_cluster
}

scenario_memory() {
  local stack="$1" n
  for n in $MEMORY_COUNTS; do
    start_cluster "$stack" "memory-$n"
    run_loadgen "$stack" "memory-$n" idle --connections "$n" --rooms 100 --settle 5s \
      --hold "$HOLD" --source-ips 8 --connect-concurrency 500 --connect-timeout 30s
    stop_cluster
  done
}

scenario_bigroom() {
  local stack="$1"
  start_cluster "$stack" bigroom
  # Two load generator threads: every message arrives on 2,000 sockets at once, and one thread
  # receiving them all in turn would add its own queue to every stack's latency.
  run_loadgen "$stack" bigroom fanout --clients "$BIGROOM_CLIENTS" --rooms 1 --senders 1 \
    --rates 20 --size 64 --duration "$BIGROOM_DURATION" --drain 3s --settle 2s --threads 2
  stop_cluster
}

scenario_publish() {
  local stack="$1" style
  for style in typed typed-cid; do
    # Only the gateway deduplicates by cid.
    [[ $stack != gateway && $style == typed-cid ]] && continue
    start_cluster "$stack" "publish-$style"
    run_loadgen "$stack" "publish-$style" fanout --clients "$PUBLISH_CLIENTS" \
      --rooms "$((PUBLISH_CLIENTS / 2))" --senders 1 --rates 20 --size 64 \
      --duration "$STEP_DURATION" --drain 3s --settle 2s --send-style "$style"
    stop_cluster
  done
}

scenario_storm() {
  local stack="$1"
  start_cluster "$stack" storm
  run_loadgen "$stack" storm storm --connections "$STORM_CONNECTIONS" --rooms 100 \
    --connect-concurrency 1000 --connect-timeout 30s --source-ips 8
  stop_cluster
}

log "results in $OUT"
for stack in "${STACK_LIST[@]}"; do
  for scenario in "${SCENARIO_LIST[@]}"; do
    case "$scenario" in
      fanout|memory|bigroom|storm|publish) "scenario_$scenario" "$stack" ;;
      *) echo "unknown scenario: $scenario" >&2; exit 2 ;;
    esac
  done
done

python3 "$LOADTEST/bench_summary.py" "$RESULTS" "$OUT"
log "summary: $OUT/summary.md"
