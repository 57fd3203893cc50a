#!/usr/bin/env bash
# Native chat cluster without containers: redis-server, N chat-gateway nodes,
# nginx in front of them (TLS for clients, an internal listener for metrics and
# the API), Prometheus scraping them and the Redis exporter, all on 127.0.0.1
# and all from Debian packages plus the gateway's release binary.
#
# Run `deploy/local/cluster.sh help` for commands and settings.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)
# shellcheck source=deploy/local/render.sh
. "$SCRIPT_DIR/render.sh"

NGINX_TEMPLATE="$REPO_ROOT/deploy/nginx/nginx.conf"
SELF_SIGNED_CERT="$REPO_ROOT/deploy/nginx/self-signed-cert.sh"
PROMETHEUS_TEMPLATE="$REPO_ROOT/deploy/prometheus/prometheus.yml"
HOST=127.0.0.1

usage() {
    cat <<EOF
usage: ${0##*/} COMMAND [ARGS]

commands:
  up [--nodes N] [--no-prometheus] [--no-redis-exporter]
                  start redis, the Redis exporter, N gateway nodes (default
                  3), nginx and Prometheus in the background; wait until
                  each answers
  down            stop everything this cluster started (also after a failed up)
  status          show what runs (exit 0: all running, 3: not all running)
  env             print the cluster's addresses as shell assignments
                  (eval "\$(${0##*/} env)")
  kill-node I     SIGKILL node I (1-based), as in a crash
  stop-node I     SIGTERM node I (graceful: clients get close code 1012)
  start-node I    start node I again and wait until it is ready
  stop-redis      stop the cluster's redis-server (broker outage)
  start-redis     start it again
  install-deps    apt-get install the Debian packages the cluster needs

settings (environment; \`up\` records them, later commands reuse them):
  CLUSTER_DIR              state dir: pids, logs, rendered configs, data
                           (default: <repo>/.cluster)
  GATEWAY_BIN              gateway binary (default: <repo>/target/release/chat-gateway)
  CLUSTER_NODES            number of gateway nodes (default 3; --nodes wins)
  CLUSTER_HTTPS_PORT       nginx, the cluster's entry point: TLS (default 8443)
  CLUSTER_HTTP_PORT        nginx, plain HTTP redirecting to https (default 8080)
  CLUSTER_INTERNAL_PORT    nginx, internal listener: /metrics, /api/, /healthz,
                           /readyz of the nodes' internal ports (default 9080)
  CLUSTER_TLS_CERT, CLUSTER_TLS_KEY
                           nginx's certificate (full chain) and key; without
                           them a self-signed one for 127.0.0.1 and localhost
                           is made in CLUSTER_DIR/tls (needs openssl)
  CLUSTER_NODE_BASE_PORT   node i listens on BASE+i-1 (default 8081)
  CLUSTER_NODE_PORTS       explicit node ports, e.g. "18081 18082 18083"
                           (overrides the base port; sets the node count)
  CLUSTER_NODE_INTERNAL_BASE_PORT
                           node i's internal listener (--internal-listen:
                           /metrics, /api/) on BASE+i-1 (default 9181)
  CLUSTER_NODE_INTERNAL_PORTS
                           explicit internal ports, one per node
  CLUSTER_REDIS_PORT       redis-server (default 6390)
  CLUSTER_PROMETHEUS_PORT  Prometheus (default 9090)
  CLUSTER_PROMETHEUS       1 to run Prometheus, 0 to skip it (default 1)
  CLUSTER_REDIS_EXPORTER   1 to run prometheus-redis-exporter (Prometheus
                           scrapes it), 0 to skip it, auto (default): run it
                           when it is installed and Prometheus runs
  CLUSTER_REDIS_EXPORTER_PORT
                           the exporter's port (default: the first free
                           port from 9121 up)
  CLUSTER_TIMEOUT          seconds to wait for each component (default 30)
  CLUSTER_API_ALLOW        networks nginx lets reach the server API /api/
                           (addresses or CIDRs, e.g. "127.0.0.1/32"; default
                           none: nginx answers 403). The nodes also need
                           GATEWAY_API_KEY.
  GATEWAY_*, RUST_LOG      passed on to every node (e.g. GATEWAY_OUTBOX_CAPACITY);
                           the script itself sets --listen, --internal-listen,
                           --node-id, --redis-url, and a random GATEWAY_SESSION_SECRET
                           shared by the nodes unless one is given
Everything listens on 127.0.0.1 only.
EOF
}

die() {
    echo "cluster: $*" >&2
    exit 1
}

log() {
    echo "cluster: $*" >&2
}

need() {
    local tool=$1 pkg=$2
    command -v "$tool" >/dev/null 2>&1 ||
        die "'$tool' not found; install it with: apt-get install -y $pkg (or: ${0##*/} install-deps)"
}

is_uint() {
    [[ $1 =~ ^[0-9]+$ ]]
}

is_port() {
    [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535))
}

is_positive() {
    [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1))
}

# ---------------------------------------------------------------------------
# configuration

STATE_FILE=""

load_config() {
    CLUSTER_DIR=${CLUSTER_DIR:-$REPO_ROOT/.cluster}
    case $CLUSTER_DIR in
        /*) ;;
        *) CLUSTER_DIR="$PWD/$CLUSTER_DIR" ;;
    esac
    STATE_FILE="$CLUSTER_DIR/cluster.env"
    RUN_DIR="$CLUSTER_DIR/run"
    LOG_DIR="$CLUSTER_DIR/logs"
    CONF_DIR="$CLUSTER_DIR/conf"
}

# Settings for `up` from the environment and flags.
config_from_env() {
    local nodes_flag=$1 prom_flag=$2 exporter_flag=$3
    GATEWAY_BIN=${GATEWAY_BIN:-$REPO_ROOT/target/release/chat-gateway}
    case $GATEWAY_BIN in
        /*) ;;
        *) GATEWAY_BIN="$PWD/$GATEWAY_BIN" ;;
    esac
    CLUSTER_HTTPS_PORT=${CLUSTER_HTTPS_PORT:-8443}
    CLUSTER_HTTP_PORT=${CLUSTER_HTTP_PORT:-8080}
    CLUSTER_INTERNAL_PORT=${CLUSTER_INTERNAL_PORT:-9080}
    CLUSTER_REDIS_PORT=${CLUSTER_REDIS_PORT:-6390}
    CLUSTER_PROMETHEUS_PORT=${CLUSTER_PROMETHEUS_PORT:-9090}
    CLUSTER_PROMETHEUS=${prom_flag:-${CLUSTER_PROMETHEUS:-1}}
    CLUSTER_TIMEOUT=${CLUSTER_TIMEOUT:-30}
    CLUSTER_REDIS_EXPORTER=${exporter_flag:-${CLUSTER_REDIS_EXPORTER:-auto}}
    local base=${CLUSTER_NODE_BASE_PORT:-8081}
    local nodes=${nodes_flag:-${CLUSTER_NODES:-}} i

    NODE_PORTS=()
    if [ -n "${CLUSTER_NODE_PORTS:-}" ]; then
        read -r -a NODE_PORTS <<<"${CLUSTER_NODE_PORTS//,/ }"
        if [ -n "$nodes" ] && [ "$nodes" != "${#NODE_PORTS[@]}" ]; then
            die "--nodes/CLUSTER_NODES=$nodes but CLUSTER_NODE_PORTS lists ${#NODE_PORTS[@]} ports"
        fi
    else
        nodes=${nodes:-3}
        is_positive "$nodes" || die "node count must be a positive integer, got '$nodes'"
        is_uint "$base" || die "CLUSTER_NODE_BASE_PORT must be a port number, got '$base'"
        local i
        for ((i = 0; i < nodes; i++)); do
            NODE_PORTS+=($((base + i)))
        done
    fi
    CLUSTER_NODES=${#NODE_PORTS[@]}
    [ "$CLUSTER_NODES" -ge 1 ] || die "no gateway nodes configured"

    NODE_INTERNAL_PORTS=()
    if [ -n "${CLUSTER_NODE_INTERNAL_PORTS:-}" ]; then
        read -r -a NODE_INTERNAL_PORTS <<<"${CLUSTER_NODE_INTERNAL_PORTS//,/ }"
        [ "${#NODE_INTERNAL_PORTS[@]}" = "$CLUSTER_NODES" ] ||
            die "CLUSTER_NODE_INTERNAL_PORTS lists ${#NODE_INTERNAL_PORTS[@]} ports for $CLUSTER_NODES nodes"
    else
        local internal_base=${CLUSTER_NODE_INTERNAL_BASE_PORT:-9181}
        is_uint "$internal_base" || die "CLUSTER_NODE_INTERNAL_BASE_PORT must be a port number, got '$internal_base'"
        for ((i = 0; i < CLUSTER_NODES; i++)); do
            NODE_INTERNAL_PORTS+=($((internal_base + i)))
        done
    fi

    local p
    for p in "$CLUSTER_HTTPS_PORT" "$CLUSTER_HTTP_PORT" "$CLUSTER_INTERNAL_PORT" "$CLUSTER_REDIS_PORT" \
        "$CLUSTER_PROMETHEUS_PORT" "${NODE_PORTS[@]}" "${NODE_INTERNAL_PORTS[@]}"; do
        is_port "$p" || die "invalid port '$p'"
    done

    # Either both or neither: a certificate without its key (or the reverse)
    # is a mistake, not a request for a self-signed one.
    if [ -n "${CLUSTER_TLS_CERT:-}${CLUSTER_TLS_KEY:-}" ]; then
        if [ -z "${CLUSTER_TLS_CERT:-}" ] || [ -z "${CLUSTER_TLS_KEY:-}" ]; then
            die "set both CLUSTER_TLS_CERT and CLUSTER_TLS_KEY, or neither (for a self-signed certificate)"
        fi
        local f
        for f in "$CLUSTER_TLS_CERT" "$CLUSTER_TLS_KEY"; do
            [ -r "$f" ] || die "cannot read $f"
        done
        CLUSTER_TLS_CERT=$(readlink -f -- "$CLUSTER_TLS_CERT")
        CLUSTER_TLS_KEY=$(readlink -f -- "$CLUSTER_TLS_KEY")
    else
        CLUSTER_TLS_CERT="$CLUSTER_DIR/tls/tls.crt"
        CLUSTER_TLS_KEY="$CLUSTER_DIR/tls/tls.key"
    fi
    is_uint "$CLUSTER_TIMEOUT" || die "CLUSTER_TIMEOUT must be whole seconds, got '$CLUSTER_TIMEOUT'"
    case $CLUSTER_PROMETHEUS in
        0 | 1) ;;
        *) die "CLUSTER_PROMETHEUS must be 0 or 1, got '$CLUSTER_PROMETHEUS'" ;;
    esac

    # The exporter: resolved to 0 or 1 here, so later commands see what `up` did.
    CLUSTER_REDIS_EXPORTER_BIN=$(redis_exporter_bin || true)
    case $CLUSTER_REDIS_EXPORTER in
        auto)
            if [ "$CLUSTER_PROMETHEUS" = 1 ] && [ -n "$CLUSTER_REDIS_EXPORTER_BIN" ]; then
                CLUSTER_REDIS_EXPORTER=1
            else
                CLUSTER_REDIS_EXPORTER=0
            fi
            ;;
        1)
            [ -n "$CLUSTER_REDIS_EXPORTER_BIN" ] ||
                die "CLUSTER_REDIS_EXPORTER=1 but prometheus-redis-exporter is not installed (apt-get install -y prometheus-redis-exporter, or: ${0##*/} install-deps)"
            ;;
        0) ;;
        *) die "CLUSTER_REDIS_EXPORTER must be 0, 1 or auto, got '$CLUSTER_REDIS_EXPORTER'" ;;
    esac
    if [ "$CLUSTER_REDIS_EXPORTER" = 1 ]; then
        if [ -n "${CLUSTER_REDIS_EXPORTER_PORT:-}" ]; then
            is_port "$CLUSTER_REDIS_EXPORTER_PORT" || die "invalid port '$CLUSTER_REDIS_EXPORTER_PORT'"
        else
            CLUSTER_REDIS_EXPORTER_PORT=$(first_free_port 9121)
        fi
    else
        CLUSTER_REDIS_EXPORTER_PORT=""
    fi
}

# The Redis exporter's executable: Debian's name, or upstream's.
redis_exporter_bin() {
    command -v prometheus-redis-exporter || command -v redis_exporter
}

# first_free_port P: P or the next port above it that nobody listens on
# (skipping the cluster's own ports).
first_free_port() {
    local p=$1
    while port_in_use "$p" || [[ " $CLUSTER_HTTPS_PORT $CLUSTER_HTTP_PORT $CLUSTER_INTERNAL_PORT $CLUSTER_REDIS_PORT $CLUSTER_PROMETHEUS_PORT ${NODE_PORTS[*]} ${NODE_INTERNAL_PORTS[*]} " == *" $p "* ]]; do
        p=$((p + 1))
        ((p <= 65535)) || die "no free port for the Redis exporter; set CLUSTER_REDIS_EXPORTER_PORT"
    done
    echo "$p"
}

# Writes the settings of a cluster being started, including the GATEWAY_* and
# RUST_* variables the nodes inherit, so that start-node and friends restart
# components exactly as `up` did.
save_config() {
    local name
    {
        echo "# written by deploy/local/cluster.sh up; do not edit while the cluster runs"
        for name in GATEWAY_BIN CLUSTER_HTTPS_PORT CLUSTER_HTTP_PORT CLUSTER_INTERNAL_PORT \
            CLUSTER_TLS_CERT CLUSTER_TLS_KEY CLUSTER_REDIS_PORT CLUSTER_PROMETHEUS_PORT \
            CLUSTER_PROMETHEUS CLUSTER_TIMEOUT CLUSTER_NODES CLUSTER_REDIS_EXPORTER \
            CLUSTER_REDIS_EXPORTER_PORT CLUSTER_REDIS_EXPORTER_BIN; do
            printf '%s=%q\n' "$name" "${!name}"
        done
        printf 'NODE_PORTS=(%s)\n' "${NODE_PORTS[*]}"
        printf 'NODE_INTERNAL_PORTS=(%s)\n' "${NODE_INTERNAL_PORTS[*]}"
        while IFS= read -r name; do
            case $name in
                GATEWAY_BIN | GATEWAY_LISTEN | GATEWAY_INTERNAL_LISTEN | GATEWAY_NODE_ID) continue ;;
                GATEWAY_* | RUST_LOG | RUST_BACKTRACE) printf 'export %s=%q\n' "$name" "${!name}" ;;
            esac
        done < <(compgen -e)
    } >"$STATE_FILE"
}

# Settings of an existing cluster (recorded by `up`).
config_from_state() {
    [ -f "$STATE_FILE" ] || die "no cluster in $CLUSTER_DIR (run: ${0##*/} up)"
    # shellcheck source=/dev/null
    . "$STATE_FILE"
}

node_port() {
    local i=$1
    if ! is_positive "$i" || ((10#$i > CLUSTER_NODES)); then
        die "node index must be 1..$CLUSTER_NODES, got '$i'"
    fi
    echo "${NODE_PORTS[$((i - 1))]}"
}

node_internal_port() {
    node_port "$1" >/dev/null
    echo "${NODE_INTERNAL_PORTS[$(($1 - 1))]}"
}

# ---------------------------------------------------------------------------
# processes
#
# Each component has a pid file run/NAME.pid with three lines: pid, the
# program's executable and a token that must appear as a whole argument in its
# command line (its listen address or a path inside this cluster's directory).
# A pid counts as ours only if all three still match, so a recycled pid is
# never signalled.

pid_file() {
    echo "$RUN_DIR/$1.pid"
}

# Prints the pid of component NAME if it is running, else fails.
running_pid() {
    local file pid exe token actual cmdline
    file=$(pid_file "$1")
    [ -f "$file" ] || return 1
    { IFS= read -r pid && IFS= read -r exe && IFS= read -r token; } <"$file" || return 1
    is_uint "$pid" || return 1
    actual=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    actual=${actual% (deleted)} # binary replaced by a rebuild while running
    [ "$actual" = "$exe" ] || return 1
    # Arguments are NUL-terminated: as spaces, every argument ends with one.
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ " $cmdline" == *" $token "* ]] || return 1
    echo "$pid"
}

port_in_use() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# spawn NAME TOKEN LOGFILE CMD... : start CMD detached (own session, stdio to
# LOGFILE), record its pid file.
spawn() {
    local name=$1 token=$2 logfile=$3
    shift 3
    local exe pid deadline actual again cmdline setsid_exe
    exe=$(readlink -f -- "$(command -v -- "$1")")
    setsid_exe=$(readlink -f -- "$(command -v setsid)")
    {
        echo "=== $(date '+%Y-%m-%d %H:%M:%S') starting $name: $*"
    } >>"$logfile"
    setsid "$@" </dev/null >>"$logfile" 2>&1 &
    pid=$!
    # Wait for the program's exec (fork -> setsid -> program), then record
    # the executable the kernel reports: for a script that is its
    # interpreter, so wrappers work as GATEWAY_BIN too. The executable is
    # read before and after the command line so that an exec in between
    # cannot pair one program's executable with the next one's arguments.
    deadline=$((SECONDS + 5))
    while :; do
        actual=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        again=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
        if [ -n "$actual" ] && [ "$actual" = "$again" ] && [ "$actual" != "$setsid_exe" ] &&
            [[ " $cmdline" == *" $token "* ]]; then
            exe=${actual% (deleted)}
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            break
        fi
        sleep 0.05
    done
    printf '%s\n%s\n%s\n' "$pid" "$exe" "$token" >"$(pid_file "$name")"
    STARTED+=("$name")
}

# signal_group SIG PID: signal the process group PID leads (every component
# runs in its own session, so that is the component and its children, e.g.
# nginx workers); falls back to the single process.
signal_group() {
    kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true
}

# stop NAME SIGNAL GRACE: signal the component, wait up to GRACE seconds,
# then SIGKILL. Removes its pid file.
stop() {
    local name=$1 sig=$2 grace=$3 pid deadline file
    file=$(pid_file "$name")
    if ! pid=$(running_pid "$name"); then
        if [ -f "$file" ]; then
            rm -f "$file"
            echo "$name: not running (stale pid file removed)"
        fi
        return 0
    fi
    signal_group "$sig" "$pid"
    deadline=$((SECONDS + grace))
    while running_pid "$name" >/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    if running_pid "$name" >/dev/null; then
        log "$name (pid $pid) still running after ${grace}s, sending SIGKILL"
        signal_group KILL "$pid"
        deadline=$((SECONDS + 5))
        while running_pid "$name" >/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.1
        done
    fi
    # Reap it if it is our own child (failed `up`), so no zombie lingers.
    wait "$pid" 2>/dev/null || true
    # Leftovers of its group (children that outlived it): the group id cannot
    # be reused while any member lives, so this only hits our processes.
    if kill -0 -- "-$pid" 2>/dev/null; then
        sleep 0.5
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$file"
    echo "$name: stopped (pid $pid, SIG$sig)"
}

# wait_ready NAME LOGFILE DESCRIPTION CHECK... : poll CHECK until it succeeds,
# the component dies, or CLUSTER_TIMEOUT passes.
wait_ready() {
    local name=$1 logfile=$2 what=$3
    shift 3
    local deadline=$((SECONDS + CLUSTER_TIMEOUT + 1)) # SECONDS ticks whole seconds
    while :; do
        if ! running_pid "$name" >/dev/null; then
            fail_component "$name" "$logfile" "exited before $what"
            return 1
        fi
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail_component "$name" "$logfile" "did not pass '$what' within ${CLUSTER_TIMEOUT}s"
            return 1
        fi
        sleep 0.2
    done
}

fail_component() {
    local name=$1 logfile=$2 why=$3
    log "$name $why; last lines of $logfile:"
    tail -n 20 "$logfile" 2>/dev/null | sed 's/^/    /' >&2 || true
}

http_ok() {
    curl -fs --max-time 2 -o /dev/null "$1"
}

redis_ping() {
    [ "$(redis-cli -h "$HOST" -p "$CLUSTER_REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
}

# ---------------------------------------------------------------------------
# components

start_redis() {
    local logfile="$LOG_DIR/redis.log"
    port_in_use "$CLUSTER_REDIS_PORT" &&
        die "port $CLUSTER_REDIS_PORT (redis) is already in use; set CLUSTER_REDIS_PORT"
    mkdir -p "$CLUSTER_DIR/redis"
    # Pub/sub only: no RDB/AOF persistence; its own working dir. The process
    # title is left alone so the pid file check can find --dir in it.
    spawn redis "$CLUSTER_DIR/redis" "$logfile" \
        redis-server --bind "$HOST" --port "$CLUSTER_REDIS_PORT" \
        --save "" --appendonly no --dir "$CLUSTER_DIR/redis" \
        --daemonize no --logfile "" --protected-mode yes --set-proc-title no
    wait_ready redis "$logfile" "redis PING" redis_ping
}

start_redis_exporter() {
    local logfile="$LOG_DIR/redis-exporter.log" listen="$HOST:$CLUSTER_REDIS_EXPORTER_PORT" name
    port_in_use "$CLUSTER_REDIS_EXPORTER_PORT" &&
        die "port $CLUSTER_REDIS_EXPORTER_PORT (redis exporter) is already in use; set CLUSTER_REDIS_EXPORTER_PORT or CLUSTER_REDIS_EXPORTER=0"
    # The exporter also reads REDIS_ADDR, REDIS_PASSWORD, ... from the
    # environment (e.g. a REDIS_PASSWORD exported for compose); this Redis has
    # no password, so it gets its settings from the flags alone.
    local hidden=()
    while IFS= read -r name; do
        case $name in
            REDIS_*) hidden+=("$name") ;;
        esac
    done < <(compgen -e)
    if [ "${#hidden[@]}" -gt 0 ]; then
        export -n "${hidden[@]}"
    fi
    spawn redis-exporter "$listen" "$logfile" \
        "$CLUSTER_REDIS_EXPORTER_BIN" -redis.addr "redis://$HOST:$CLUSTER_REDIS_PORT" \
        -web.listen-address "$listen"
    if [ "${#hidden[@]}" -gt 0 ]; then
        export "${hidden[@]}"
    fi
    wait_ready redis-exporter "$logfile" "GET /health" http_ok "http://$listen/health"
}

start_node() {
    local i=$1 port internal_port logfile
    port=$(node_port "$i")
    internal_port=$(node_internal_port "$i")
    logfile="$LOG_DIR/node-$i.log"
    if running_pid "node-$i" >/dev/null; then
        die "node-$i is already running"
    fi
    port_in_use "$port" && die "port $port (node-$i) is already in use; set CLUSTER_NODE_BASE_PORT or CLUSTER_NODE_PORTS"
    port_in_use "$internal_port" &&
        die "port $internal_port (node-$i, internal) is already in use; set CLUSTER_NODE_INTERNAL_BASE_PORT or CLUSTER_NODE_INTERNAL_PORTS"
    # Plain log files: no ANSI colours from the gateway's text logger.
    export NO_COLOR=${NO_COLOR:-1}
    # nginx on $HOST is the clients' way in: believe its X-Forwarded-For, so the
    # per-address connection limit counts clients, not nginx.
    export GATEWAY_TRUSTED_PROXIES=${GATEWAY_TRUSTED_PROXIES:-$HOST/32}
    spawn "node-$i" "$HOST:$port" "$logfile" \
        "$GATEWAY_BIN" --listen "$HOST:$port" --internal-listen "$HOST:$internal_port" \
        --node-id "node-$i" --redis-url "redis://$HOST:$CLUSTER_REDIS_PORT"
    wait_ready "node-$i" "$logfile" "GET /readyz" http_ok "http://$HOST:$port/readyz"
}

nginx_args() {
    # -p: prefix for relative paths; -e/-g: logs and pid file under the state
    # dir, foreground so the recorded pid is the master process.
    printf '%s\n' -p "$CLUSTER_DIR/nginx/" -c "$CONF_DIR/nginx.conf" -e stderr \
        -g "daemon off; pid $CLUSTER_DIR/nginx/nginx.pid;"
}

# The operator's certificate, or a self-signed one made once per state dir.
ensure_certificate() {
    [ "$CLUSTER_TLS_CERT" = "$CLUSTER_DIR/tls/tls.crt" ] || return 0
    need openssl openssl
    sh "$SELF_SIGNED_CERT" "$CLUSTER_DIR/tls" localhost "$HOST" >&2 ||
        die "could not make a self-signed certificate in $CLUSTER_DIR/tls"
}

start_nginx() {
    local logfile="$LOG_DIR/nginx.log" addrs=() internal_addrs=() port args=() name
    for name in HTTPS HTTP INTERNAL; do
        port="CLUSTER_${name}_PORT"
        port_in_use "${!port}" && die "port ${!port} (nginx) is already in use; set $port"
    done
    for port in "${NODE_PORTS[@]}"; do
        addrs+=("$HOST:$port")
    done
    for port in "${NODE_INTERNAL_PORTS[@]}"; do
        internal_addrs+=("$HOST:$port")
    done
    ensure_certificate
    mkdir -p "$CLUSTER_DIR/nginx/temp"
    render_nginx "$NGINX_TEMPLATE" "$CONF_DIR/nginx.conf" \
        https="$HOST:$CLUSTER_HTTPS_PORT" http="$HOST:$CLUSTER_HTTP_PORT" \
        internal="$HOST:$CLUSTER_INTERNAL_PORT" redirect_port="$CLUSTER_HTTPS_PORT" \
        cert="$CLUSTER_TLS_CERT" key="$CLUSTER_TLS_KEY" temp="$CLUSTER_DIR/nginx/temp" \
        servers="${addrs[*]}" internal_servers="${internal_addrs[*]}" ||
        die "could not render $NGINX_TEMPLATE"
    mapfile -t args < <(nginx_args)
    if ! nginx -t -q "${args[@]}" >>"$logfile" 2>&1; then
        fail_component nginx "$logfile" "rejected its config $CONF_DIR/nginx.conf"
        return 1
    fi
    spawn nginx "$CONF_DIR/nginx.conf" "$logfile" nginx "${args[@]}"
    wait_ready nginx "$logfile" "GET /healthz through nginx's internal listener" \
        http_ok "http://$HOST:$CLUSTER_INTERNAL_PORT/healthz"
}

start_prometheus() {
    local logfile="$LOG_DIR/prometheus.log" targets=() port
    port_in_use "$CLUSTER_PROMETHEUS_PORT" &&
        die "port $CLUSTER_PROMETHEUS_PORT (prometheus) is already in use; set CLUSTER_PROMETHEUS_PORT or CLUSTER_PROMETHEUS=0"
    # Metrics are served on the nodes' internal listeners only.
    for port in "${NODE_INTERNAL_PORTS[@]}"; do
        targets+=("$HOST:$port")
    done
    mkdir -p "$CLUSTER_DIR/prometheus/data"
    local exporter=""
    if [ "${CLUSTER_REDIS_EXPORTER:-0}" = 1 ]; then
        exporter="$HOST:$CLUSTER_REDIS_EXPORTER_PORT"
    fi
    # Also copies the alert rules (alerts.yml) into $CONF_DIR.
    render_prometheus "$PROMETHEUS_TEMPLATE" "$CONF_DIR/prometheus.yml" \
        "$HOST:$CLUSTER_PROMETHEUS_PORT" "$exporter" "${targets[@]}" || die "could not render $PROMETHEUS_TEMPLATE"
    spawn prometheus "--storage.tsdb.path=$CLUSTER_DIR/prometheus/data" "$logfile" \
        prometheus --config.file="$CONF_DIR/prometheus.yml" \
        --storage.tsdb.path="$CLUSTER_DIR/prometheus/data" \
        --storage.tsdb.retention.time=2d \
        --web.listen-address="$HOST:$CLUSTER_PROMETHEUS_PORT"
    wait_ready prometheus "$logfile" "GET /-/ready" http_ok "http://$HOST:$CLUSTER_PROMETHEUS_PORT/-/ready"
}

# Components in start order (stop order is the reverse).
components() {
    local i
    echo redis
    [ "${CLUSTER_REDIS_EXPORTER:-0}" = 1 ] && echo redis-exporter
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        echo "node-$i"
    done
    echo nginx
    [ "$CLUSTER_PROMETHEUS" = 1 ] && echo prometheus
    return 0
}

stop_grace() {
    case $1 in
        node-*) echo 15 ;; # the gateway drains within --shutdown-grace (5s default)
        *) echo 10 ;;
    esac
}

# ---------------------------------------------------------------------------
# commands

STARTED=()

abort_up() {
    local rc=$? i
    trap - EXIT INT TERM
    if [ "${#STARTED[@]}" -gt 0 ]; then
        log "start-up failed; stopping what was started"
        for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
            stop "${STARTED[$i]}" TERM "$(stop_grace "${STARTED[$i]}")" >&2 || true
        done
    fi
    exit $((rc == 0 ? 1 : rc))
}

cmd_up() {
    local nodes_flag="" prom_flag="" exporter_flag=""
    while [ "$#" -gt 0 ]; do
        case $1 in
            --nodes) [ "$#" -ge 2 ] || die "--nodes needs a value"; nodes_flag=$2; shift 2 ;;
            --nodes=*) nodes_flag=${1#--nodes=}; shift ;;
            --no-prometheus) prom_flag=0; shift ;;
            --no-redis-exporter) exporter_flag=0; shift ;;
            -h | --help) usage; exit 0 ;;
            *) die "up: unknown argument '$1'" ;;
        esac
    done
    config_from_env "$nodes_flag" "$prom_flag" "$exporter_flag"

    if [ ! -x "$GATEWAY_BIN" ]; then
        die "gateway binary not found at $GATEWAY_BIN
build it with:  cargo build --release -p gateway   (from $REPO_ROOT)
or point GATEWAY_BIN at an existing build, e.g. GATEWAY_BIN=target/debug/chat-gateway"
    fi
    need redis-server redis-server
    need redis-cli redis-tools
    need nginx nginx-light
    need curl curl
    need setsid util-linux
    if [ "$CLUSTER_PROMETHEUS" = 1 ]; then
        need prometheus prometheus
    fi

    # Refuse to start over a running cluster in the same state dir.
    if [ -d "$RUN_DIR" ]; then
        local f name
        for f in "$RUN_DIR"/*.pid; do
            [ -e "$f" ] || continue
            name=$(basename "$f" .pid)
            if running_pid "$name" >/dev/null; then
                die "a cluster is already running in $CLUSTER_DIR ($name); run: ${0##*/} down"
            fi
            rm -f "$f"
        done
    fi

    mkdir -p "$RUN_DIR" "$LOG_DIR" "$CONF_DIR"
    local l
    for l in "$LOG_DIR"/*.log; do
        [ -e "$l" ] && : >"$l"
    done
    # One secret for every node, so a reconnect token from one node keeps its
    # userId on any other; recorded with the rest, so restarted nodes share it.
    if [ -z "${GATEWAY_SESSION_SECRET:-}" ] && [ -z "${GATEWAY_SESSION_SECRET_FILE:-}" ]; then
        GATEWAY_SESSION_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
        export GATEWAY_SESSION_SECRET
    fi
    save_config

    trap abort_up EXIT INT TERM
    start_redis
    if [ "$CLUSTER_REDIS_EXPORTER" = 1 ]; then
        start_redis_exporter
    fi
    local i
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        start_node "$i"
    done
    start_nginx
    if [ "$CLUSTER_PROMETHEUS" = 1 ]; then
        start_prometheus
    fi
    trap - EXIT INT TERM

    echo "chat cluster is up ($CLUSTER_NODES nodes, state in $CLUSTER_DIR)"
    echo "  entry (nginx)  https://$HOST:$CLUSTER_HTTPS_PORT/   wss://$HOST:$CLUSTER_HTTPS_PORT/ws?room=lobby"
    echo "                 http://$HOST:$CLUSTER_HTTP_PORT/ redirects there; certificate: $CLUSTER_TLS_CERT"
    echo "  internal       http://$HOST:$CLUSTER_INTERNAL_PORT/   (/metrics, /api/, /healthz, /readyz of some node)"
    echo "                 log: $LOG_DIR/nginx.log"
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        printf '  %-14s http://%s:%s/ internal http://%s:%s/   log: %s\n' "node-$i" "$HOST" \
            "${NODE_PORTS[$((i - 1))]}" "$HOST" "${NODE_INTERNAL_PORTS[$((i - 1))]}" "$LOG_DIR/node-$i.log"
    done
    echo "  redis          redis://$HOST:$CLUSTER_REDIS_PORT   log: $LOG_DIR/redis.log"
    if [ "$CLUSTER_REDIS_EXPORTER" = 1 ]; then
        echo "  redis exporter http://$HOST:$CLUSTER_REDIS_EXPORTER_PORT/metrics   log: $LOG_DIR/redis-exporter.log"
    fi
    if [ "$CLUSTER_PROMETHEUS" = 1 ]; then
        echo "  prometheus     http://$HOST:$CLUSTER_PROMETHEUS_PORT/   log: $LOG_DIR/prometheus.log"
    fi
    echo "stop with: $0 down"
}

cmd_down() {
    if [ ! -d "$RUN_DIR" ]; then
        echo "no cluster state in $CLUSTER_DIR; nothing to stop"
        return 0
    fi
    # Stop whatever has a pid file (even if cluster.env is gone), entry point
    # first, broker last.
    local names=() f name
    for name in nginx prometheus; do
        [ -f "$(pid_file "$name")" ] && names+=("$name")
    done
    for f in "$RUN_DIR"/node-*.pid; do
        [ -e "$f" ] && names+=("$(basename "$f" .pid)")
    done
    [ -f "$(pid_file redis-exporter)" ] && names+=(redis-exporter)
    [ -f "$(pid_file redis)" ] && names+=(redis)
    if [ "${#names[@]}" -eq 0 ]; then
        echo "nothing running in $CLUSTER_DIR"
        return 0
    fi
    for name in "${names[@]}"; do
        stop "$name" TERM "$(stop_grace "$name")"
    done
}

cmd_status() {
    if [ ! -f "$STATE_FILE" ]; then
        echo "no cluster in $CLUSTER_DIR"
        return 3
    fi
    config_from_state
    local name pid addr health all=0 i
    echo "cluster in $CLUSTER_DIR"
    while IFS= read -r name; do
        case $name in
            redis) addr="redis://$HOST:$CLUSTER_REDIS_PORT" ;;
            redis-exporter) addr="http://$HOST:$CLUSTER_REDIS_EXPORTER_PORT" ;;
            nginx) addr="https://$HOST:$CLUSTER_HTTPS_PORT" ;;
            prometheus) addr="http://$HOST:$CLUSTER_PROMETHEUS_PORT" ;;
            node-*) i=${name#node-}; addr="http://$HOST:${NODE_PORTS[$((i - 1))]}" ;;
        esac
        if pid=$(running_pid "$name"); then
            health=""
            case $name in
                redis) redis_ping || health="no PONG" ;;
                redis-exporter) http_ok "$addr/health" || health="/health failing" ;;
                nginx) http_ok "http://$HOST:$CLUSTER_INTERNAL_PORT/healthz" || health="/healthz failing" ;;
                prometheus) http_ok "$addr/-/ready" || health="not ready" ;;
                node-*) http_ok "$addr/readyz" || health="not ready" ;;
            esac
            health=${health:-ok}
            printf '  %-14s running  pid %-7s %-28s %s\n' "$name" "$pid" "$addr" "$health"
        else
            printf '  %-14s stopped  %-11s %s\n' "$name" "" "$addr"
            all=3
        fi
    done < <(components)
    return "$all"
}

cmd_env() {
    config_from_state
    local urls=() i
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        urls+=("http://$HOST:${NODE_PORTS[$((i - 1))]}")
        printf 'CLUSTER_NODE_%d_URL=%q\n' "$i" "${urls[-1]}"
        printf 'CLUSTER_NODE_%d_INTERNAL_URL=%q\n' "$i" "http://$HOST:${NODE_INTERNAL_PORTS[$((i - 1))]}"
    done
    printf 'CLUSTER_DIR=%q\n' "$CLUSTER_DIR"
    printf 'CLUSTER_NODES=%q\n' "$CLUSTER_NODES"
    printf 'CLUSTER_NODE_URLS=%q\n' "${urls[*]}"
    printf 'CLUSTER_HTTPS_URL=%q\n' "https://$HOST:$CLUSTER_HTTPS_PORT"
    printf 'CLUSTER_WS_URL=%q\n' "wss://$HOST:$CLUSTER_HTTPS_PORT/ws"
    printf 'CLUSTER_HTTP_URL=%q\n' "http://$HOST:$CLUSTER_HTTP_PORT"
    printf 'CLUSTER_INTERNAL_URL=%q\n' "http://$HOST:$CLUSTER_INTERNAL_PORT"
    printf 'CLUSTER_TLS_CERT=%q\n' "$CLUSTER_TLS_CERT"
    printf 'CLUSTER_REDIS_URL=%q\n' "redis://$HOST:$CLUSTER_REDIS_PORT"
    if [ "$CLUSTER_PROMETHEUS" = 1 ]; then
        printf 'CLUSTER_PROMETHEUS_URL=%q\n' "http://$HOST:$CLUSTER_PROMETHEUS_PORT"
    fi
    if [ "${CLUSTER_REDIS_EXPORTER:-0}" = 1 ]; then
        printf 'CLUSTER_REDIS_EXPORTER_URL=%q\n' "http://$HOST:$CLUSTER_REDIS_EXPORTER_PORT"
    fi
    printf 'CLUSTER_LOG_DIR=%q\n' "$LOG_DIR"
}

cmd_kill_node() {
    [ "$#" -eq 1 ] || die "usage: ${0##*/} kill-node I"
    config_from_state
    node_port "$1" >/dev/null
    running_pid "node-$1" >/dev/null || die "node-$1 is not running"
    stop "node-$1" KILL 5
}

cmd_stop_node() {
    [ "$#" -eq 1 ] || die "usage: ${0##*/} stop-node I"
    config_from_state
    node_port "$1" >/dev/null
    running_pid "node-$1" >/dev/null || die "node-$1 is not running"
    stop "node-$1" TERM "$(stop_grace "node-$1")"
}

cmd_start_node() {
    [ "$#" -eq 1 ] || die "usage: ${0##*/} start-node I"
    config_from_state
    node_port "$1" >/dev/null
    [ -x "$GATEWAY_BIN" ] || die "gateway binary not found at $GATEWAY_BIN"
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    # A node that fails to come up is stopped again rather than left half-up.
    trap abort_up EXIT INT TERM
    start_node "$1"
    trap - EXIT INT TERM
    echo "node-$1: ready at http://$HOST:$(node_port "$1")/ (log: $LOG_DIR/node-$1.log)"
}

cmd_stop_redis() {
    config_from_state
    running_pid redis >/dev/null || die "redis is not running"
    stop redis TERM 10
}

cmd_start_redis() {
    config_from_state
    running_pid redis >/dev/null && die "redis is already running"
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    trap abort_up EXIT INT TERM
    start_redis
    trap - EXIT INT TERM
    echo "redis: ready at redis://$HOST:$CLUSTER_REDIS_PORT"
}

cmd_install_deps() {
    local pkgs=(redis-server redis-tools nginx-light prometheus prometheus-redis-exporter curl util-linux openssl)
    if [ "$(id -u)" -ne 0 ]; then
        die "run as root (or: sudo apt-get install -y ${pkgs[*]})"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" ||
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}"; }
}

main() {
    [ "$#" -ge 1 ] || { usage >&2; exit 2; }
    local cmd=$1
    shift
    load_config
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        env) cmd_env "$@" ;;
        kill-node) cmd_kill_node "$@" ;;
        stop-node) cmd_stop_node "$@" ;;
        start-node) cmd_start_node "$@" ;;
        stop-redis) cmd_stop_redis "$@" ;;
        start-redis) cmd_start_redis "$@" ;;
        install-deps) cmd_install_deps "$@" ;;
        help | -h | --help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
