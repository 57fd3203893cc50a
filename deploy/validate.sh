#!/usr/bin/env bash
# Validates the shipped deployment files without Docker:
#   nginx       `nginx -t` on deploy/nginx/nginx.conf, as compose runs it and as
#               deploy/local/cluster.sh renders it (with a certificate from
#               deploy/nginx/self-signed-cert.sh); the public server routes
#               only the chat paths, the internal one has an allow list, 503s
#               are retried and old workers have a shutdown timeout
#   prometheus  `promtool check config` on both variants of prometheus.yml;
#               alerts.yml: `promtool check rules`, its unit tests
#               (`promtool test rules alerts_test.yml`), and that every alert
#               has a severity, a summary, a description and a runbook
#   grafana     provisioning YAML and dashboard JSON parse; every dashboard
#               query is valid PromQL (`promtool check rules`); every metric
#               an alert watches (and the process, API and Redis metrics) has
#               a panel
#   compose     `docker-compose config -q` (and `docker compose` when present),
#               and that it refuses to start without GRAFANA_ADMIN_PASSWORD
#   Dockerfile  build inputs exist, every workspace member's manifest is
#               copied, the stubbed workspace loads with --locked
#   scripts     shellcheck on the deploy, load test and CI scripts, when installed
# Missing Debian tools (nginx, promtool, docker-compose) are installed with
# apt-get when running as root. Exits non-zero if anything fails.
set -euo pipefail

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
# shellcheck source=deploy/local/render.sh
. deploy/local/render.sh

NGINX_CONF=deploy/nginx/nginx.conf
PROM_CONF=deploy/prometheus/prometheus.yml
PROM_ALERTS=deploy/prometheus/alerts.yml
PROM_ALERTS_TEST=deploy/prometheus/alerts_test.yml
COMPOSE_FILE=docker-compose.yml
DASHBOARD_DIR=deploy/grafana/dashboards
GRAFANA_PROVISIONING=deploy/grafana/provisioning

FAILED=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/chat-validate.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

pass() { echo "ok    $*"; }
fail() {
    echo "FAIL  $*" >&2
    FAILED+=("$1")
}

# ensure TOOL PACKAGE: install PACKAGE with apt-get if TOOL is missing.
ensure() {
    local tool=$1 pkg=$2
    command -v "$tool" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "validate: '$tool' missing; install it with: sudo apt-get install -y $pkg" >&2
        return 1
    fi
    echo "validate: installing $pkg for '$tool'" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "$pkg" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$pkg" >/dev/null; } ||
        return 1
    command -v "$tool" >/dev/null 2>&1
}

# Prefer Debian's python3: it has PyYAML (a docker-compose dependency).
PYTHON=python3
if [ -x /usr/bin/python3 ]; then
    PYTHON=/usr/bin/python3
fi

# version_ge A B: true if dotted version A >= B.
version_ge() {
    [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]
}

# ---------------------------------------------------------------------------
check_nginx() {
    if ! ensure nginx nginx-light; then
        fail nginx "nginx not available"
        return
    fi
    local version prefix="$WORK/nginx"
    version=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
    mkdir -p "$prefix/temp"
    local args=(-p "$prefix/" -e stderr -g "pid $prefix/nginx.pid;")

    # Static properties the compose setup relies on.
    local upstream
    upstream=$(sed -n '/^[[:space:]]*upstream chat_gateway[[:space:]]*{/,/^[[:space:]]*}/p' "$NGINX_CONF")
    if [ -z "$upstream" ]; then
        fail nginx "$NGINX_CONF: upstream chat_gateway not found"
    elif grep -Eq '^[[:space:]]*(ip_hash|hash|sticky)\b' <<<"$upstream"; then
        fail nginx "$NGINX_CONF: upstream must not be sticky (ip_hash/hash/sticky)"
    elif ! grep -Eq '^[[:space:]]*server[[:space:]]+gateway:8080[[:space:]].*\bresolve\b' <<<"$upstream" ||
        ! grep -Eq '^[[:space:]]*zone[[:space:]]' <<<"$upstream"; then
        fail nginx "$NGINX_CONF: compose upstream must be 'server gateway:8080 resolve' with a zone"
    elif ! sed -n '/^[[:space:]]*upstream chat_gateway_internal[[:space:]]*{/,/^[[:space:]]*}/p' "$NGINX_CONF" |
        grep -Eq '^[[:space:]]*server[[:space:]]+gateway:9091[[:space:]].*\bresolve\b'; then
        fail nginx "$NGINX_CONF: upstream chat_gateway_internal must be 'server gateway:9091 resolve' (GATEWAY_INTERNAL_LISTEN)"
    elif ! grep -Eq '^[[:space:]]*resolver[[:space:]]+127\.0\.0\.11[[:space:]].*valid=' "$NGINX_CONF"; then
        fail nginx "$NGINX_CONF: Docker DNS resolver 127.0.0.11 with valid= missing"
    else
        pass "nginx: upstream without stickiness, replicas re-resolved via 127.0.0.11"
    fi
    local image image_version
    image=$(sed -n 's|^[[:space:]]*image:[[:space:]]*\(nginx:[^[:space:]]*\).*|\1|p' "$COMPOSE_FILE" | head -n1)
    image_version=$(sed -n 's|^nginx:\([0-9][0-9.]*\).*|\1|p' <<<"$image")
    if [ -n "$image_version" ] && version_ge "$image_version" 1.27.3; then
        pass "nginx: compose image $image supports upstream 'resolve' (>= 1.27.3)"
    else
        fail nginx "compose nginx image '$image' must be pinned to >= 1.27.3 for upstream 'resolve'"
    fi

    # Compose variant: the shipped file. Only the temp path prefix moves into
    # a scratch dir (nginx -t creates those dirs). `gateway` only resolves
    # inside the compose network and `resolve` needs nginx >= 1.27.3, so with
    # an older local nginx the upstream line is checked with the name
    # replaced by an address and `resolve` dropped -- exactly what cluster.sh
    # does; the rest of the file is tested unchanged.
    # What the public and internal servers let through, and how failures are retried.
    local problems=()
    grep -Eq '^[[:space:]]*worker_shutdown_timeout[[:space:]]+[0-9]+s;' "$NGINX_CONF" ||
        problems+=("no worker_shutdown_timeout: a reload would keep old workers as long as any WebSocket lives")
    grep -Eq '^[[:space:]]*proxy_next_upstream[[:space:]]+error[[:space:]]+timeout[[:space:]]+http_503;' "$NGINX_CONF" ||
        problems+=("proxy_next_upstream must be 'error timeout http_503' (a node that is not ready answers 503)")
    ! grep -Eq '^[[:space:]]*proxy_next_upstream[[:space:]].*non_idempotent' "$NGINX_CONF" ||
        problems+=("proxy_next_upstream must not retry non-idempotent requests (POST /sse/send)")
    local public
    public=$(awk '/listen 443 ssl;/ { on = 1 } on { print } on && /^    }/ { exit }' "$NGINX_CONF")
    [ "$(grep -c 'proxy_pass' <<<"$public")" = 1 ] &&
        grep -Fq 'location ~ ^/(ws|sse|sse/send|chat-client\.js|favicon\.svg|favicon\.ico)?$ {' <<<"$public" &&
        grep -Eq 'location / \{' <<<"$public" && grep -Eq 'return 404;' <<<"$public" ||
        problems+=("the public server must proxy exactly /, /ws, /sse, /sse/send and the demo page's files and answer 404 otherwise")
    awk '/listen 8081;/ { on = 1 } on { print } on && /^    }/ { exit }' "$NGINX_CONF" | grep -Eq '^[[:space:]]*deny all;' ||
        problems+=("the internal server must end its allow list with 'deny all'")
    if [ "${#problems[@]}" -eq 0 ]; then
        pass "nginx: public server routes the chat paths only, internal one has an allow list, 503 retried, workers time out"
    else
        fail nginx "$(printf '%s\n' "${problems[@]}")"
    fi

    if ! sh deploy/nginx/self-signed-cert.sh "$WORK/tls" >/dev/null; then
        fail nginx "deploy/nginx/self-signed-cert.sh could not make a certificate (openssl missing?)"
        return
    fi
    local compose_conf="$WORK/nginx-compose.conf"
    if version_ge "$version" 1.27.3; then
        sed -e "s|/var/cache/nginx|$prefix/temp|" -e "s|/etc/nginx/tls/|$WORK/tls/|" "$NGINX_CONF" >"$compose_conf"
    else
        render_nginx "$NGINX_CONF" "$compose_conf" https=443 http=80 internal=8081 redirect_port=8443 \
            cert="$WORK/tls/tls.crt" key="$WORK/tls/tls.key" temp="$prefix/temp" \
            servers=127.0.0.1:8080 internal_servers=127.0.0.1:9091
    fi
    local out
    if out=$(nginx -t -c "$compose_conf" "${args[@]}" 2>&1); then
        pass "nginx -t: compose variant (local nginx $version)"
    else
        fail nginx "nginx -t rejected the compose variant:"$'\n'"$out"
    fi

    # Native variant, rendered as cluster.sh does for three nodes, with a
    # network allowed to reach the server API.
    local native_conf="$WORK/nginx-native.conf"
    if render_nginx "$NGINX_CONF" "$native_conf" https=127.0.0.1:8443 http=127.0.0.1:8080 \
        internal=127.0.0.1:9080 redirect_port=8443 cert="$WORK/tls/tls.crt" key="$WORK/tls/tls.key" \
        temp="$prefix/temp" servers="127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083" \
        internal_servers="127.0.0.1:9181 127.0.0.1:9182 127.0.0.1:9183" &&
        out=$(nginx -t -c "$native_conf" "${args[@]}" 2>&1); then
        pass "nginx -t: native cluster variant (3 nodes)"
    else
        fail nginx "native cluster variant invalid:"$'\n'"${out:-render failed}"
    fi
}

# ---------------------------------------------------------------------------
check_prometheus() {
    if ! ensure promtool prometheus; then
        fail prometheus "promtool not available"
        return
    fi
    local out
    if out=$(promtool check config "$PROM_CONF" 2>&1); then
        pass "promtool check config: $PROM_CONF"
    else
        fail prometheus "$out"
    fi
    if grep -q 'dns_sd_configs' "$PROM_CONF" && grep -Eq 'names:[[:space:]]*\[[[:space:]]*"?gateway"?' "$PROM_CONF" &&
        grep -Eq '^[[:space:]]*scrape_interval:[[:space:]]*5s' "$PROM_CONF"; then
        pass "prometheus: replicas via dns_sd_configs (gateway, A), 5s scrape interval"
    else
        fail prometheus "$PROM_CONF: expected dns_sd_configs for 'gateway' and scrape_interval 5s"
    fi
    if grep -Eq '^[[:space:]]*-[[:space:]]*"?alerts\.yml"?[[:space:]]*$' "$PROM_CONF" &&
        grep -Eq '^[[:space:]]*-[[:space:]]*job_name:[[:space:]]*redis[[:space:]]*$' "$PROM_CONF"; then
        pass "prometheus: loads alerts.yml, scrapes the Redis exporter (job redis)"
    else
        fail prometheus "$PROM_CONF: expected rule_files with alerts.yml and a 'redis' scrape job"
    fi
    # Native variants, rendered as cluster.sh does (each into its own dir, so
    # the copied rule file is checked too): with and without the exporter.
    local variant exporter native
    for variant in with-exporter without-exporter; do
        exporter=""
        [ "$variant" = with-exporter ] && exporter=127.0.0.1:9121
        mkdir -p "$WORK/prometheus-$variant"
        native="$WORK/prometheus-$variant/prometheus.yml"
        out=""
        if render_prometheus "$PROM_CONF" "$native" 127.0.0.1:9090 "$exporter" \
            127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083 &&
            out=$(promtool check config "$native" 2>&1); then
            pass "promtool check config: native cluster variant ($variant)"
        else
            fail prometheus "native cluster variant ($variant) invalid:"$'\n'"${out:-render failed}"
        fi
    done
    if [ -n "$(sed -n '/job_name: redis/p' "$WORK/prometheus-without-exporter/prometheus.yml")" ]; then
        fail prometheus "native variant without an exporter still has the redis job"
    fi

    if out=$(promtool check rules "$PROM_ALERTS" 2>&1); then
        pass "promtool check rules: $PROM_ALERTS"
    else
        fail prometheus "$out"
    fi
    if out=$(cd "$(dirname "$PROM_ALERTS_TEST")" && promtool test rules "$(basename "$PROM_ALERTS_TEST")" 2>&1); then
        pass "promtool test rules: $PROM_ALERTS_TEST"
    else
        fail prometheus "alert unit tests failed:"$'\n'"$out"
    fi
    if out=$("$PYTHON" - "$PROM_ALERTS" "$PROM_ALERTS_TEST" 2>&1 <<'PY'
import sys

import yaml

rules_path, tests_path = sys.argv[1:3]
alerts = [r for g in yaml.safe_load(open(rules_path))["groups"] for r in g["rules"] if "alert" in r]
problems = []
for r in alerts:
    if r.get("labels", {}).get("severity") not in ("critical", "warning"):
        problems.append(f"{r['alert']}: severity label must be critical or warning")
    missing = {"summary", "description", "runbook"} - set(r.get("annotations", {}))
    if missing:
        problems.append(f"{r['alert']}: annotations {sorted(missing)} missing")
# Each alert is tested firing (a non-empty exp_alerts) and silent (an empty one).
fired, silent = set(), set()
for test in yaml.safe_load(open(tests_path))["tests"]:
    for case in test.get("alert_rule_test", []):
        (fired if case.get("exp_alerts") else silent).add(case["alertname"])
for r in alerts:
    for kind, seen in (("firing", fired), ("not firing", silent)):
        if r["alert"] not in seen:
            problems.append(f"{r['alert']}: no unit test shows it {kind}")
if problems:
    sys.exit("\n".join(problems))
print(f"{len(alerts)} alerts")
PY
    ); then
        pass "alerts: severity, summary, description, runbook; tested firing and silent ($out)"
    else
        fail prometheus "$out"
    fi
}

# ---------------------------------------------------------------------------
check_grafana() {
    local out rules="$WORK/dashboard-rules.yml"
    if out=$("$PYTHON" - "$GRAFANA_PROVISIONING" "$DASHBOARD_DIR" "$rules" "$PROM_ALERTS" 2>&1 <<'PY'
import glob, json, os, re, sys

import yaml

prov, dash_dir, rules_path, alerts_path = sys.argv[1:5]
for path in sorted(glob.glob(os.path.join(prov, "**", "*.yml"), recursive=True)):
    doc = yaml.safe_load(open(path))
    assert doc.get("apiVersion") == 1, f"{path}: apiVersion 1 expected"
    for ds in doc.get("datasources", []):
        assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090", f"{path}: datasource"
    for p in doc.get("providers", []):
        assert p["type"] == "file" and p["options"]["path"], f"{path}: provider"

rules = []
dashboards = sorted(glob.glob(os.path.join(dash_dir, "*.json")))
assert dashboards, "no dashboards"
for path in dashboards:
    d = json.load(open(path))
    assert d.get("uid") and d.get("title"), f"{path}: uid/title missing"
    ids = set()
    for panel in d["panels"]:
        assert panel["id"] not in ids, f"{path}: duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        for t in panel.get("targets", []):
            ds = t.get("datasource") or panel.get("datasource")
            assert ds and ds.get("uid") == "prometheus", f"{path}: panel {panel['title']!r} datasource"
            expr = (t["expr"].replace("$__rate_interval", "1m")
                    .replace("$__interval", "1m").replace("$node", ".*"))
            rules.append({"record": f"dashboard:panel{panel['id']}:{t['refId']}", "expr": expr})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(rules_path, "w"))

# A panel for every signal an alert watches, and for the process, API and Redis metrics an
# on-call engineer reads next to them.
def metric_names(expr):
    return set(re.findall(r"\b((?:chat|process|redis)_[a-z0-9_]+)", expr))
shown = set().union(*(metric_names(r["expr"]) for r in rules))
wanted = set()
for group in yaml.safe_load(open(alerts_path))["groups"]:
    for rule in group["rules"]:
        wanted |= metric_names(rule["expr"])
wanted |= {
    "chat_ready", "chat_broker_repairs_total", "chat_closes_total", "chat_bytes_received_total",
    "chat_handshakes_refused_total",
    "chat_bytes_sent_total", "chat_outbox_backlog_bytes", "process_resident_memory_bytes",
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_threads",
    "chat_api_requests_total", "chat_api_request_seconds_bucket", "redis_up",
    "redis_memory_used_bytes", "redis_connected_clients", "redis_commands_processed_total",
}
missing = sorted(wanted - shown)
assert not missing, f"no dashboard panel shows {missing}"
print(f"{len(dashboards)} dashboard(s), {len(rules)} queries, every alerting signal shown")
PY
    ); then
        pass "grafana: provisioning and dashboards parse ($out)"
    else
        fail grafana "$out"
        return
    fi
    if out=$(promtool check rules "$rules" 2>&1); then
        pass "grafana: every dashboard query is valid PromQL"
    else
        fail grafana "dashboard query rejected by promtool:"$'\n'"$out"
    fi
}

# ---------------------------------------------------------------------------
check_compose() {
    if ! ensure docker-compose docker-compose; then
        fail compose "docker-compose not available"
        return
    fi
    # Secrets come from the environment or .env; check with placeholders given
    # in an env file of our own, so a developer's .env or shell cannot change
    # the outcome.
    local out env_file="$WORK/compose.env" no_env="$WORK/compose-empty.env"
    printf 'GRAFANA_ADMIN_PASSWORD=validate-placeholder\nREDIS_PASSWORD=validate-placeholder\n' >"$env_file"
    : >"$no_env"
    local compose=(env -u GRAFANA_ADMIN_PASSWORD -u REDIS_PASSWORD -u GATEWAY_SESSION_SECRET docker-compose --env-file "$env_file" -f "$COMPOSE_FILE")
    if out=$("${compose[@]}" config -q 2>&1); then
        pass "docker-compose config -q"
    else
        fail compose "$out"
    fi
    if out=$("${compose[@]}" --profile loadtest config -q 2>&1); then
        pass "docker-compose --profile loadtest config -q"
    else
        fail compose "$out"
    fi
    if out=$("${compose[@]}" -f deploy/compose/redis-cluster.yml config -q 2>&1); then
        pass "docker-compose config -q with the Redis Cluster override"
    else
        fail compose "$out"
    fi
    if docker compose version >/dev/null 2>&1; then
        if out=$(env -u GRAFANA_ADMIN_PASSWORD -u REDIS_PASSWORD \
            docker compose --env-file "$env_file" -f "$COMPOSE_FILE" config -q 2>&1); then
            pass "docker compose config -q"
        else
            fail compose "$out"
        fi
    fi
    if out=$(env -u GRAFANA_ADMIN_PASSWORD -u REDIS_PASSWORD \
        docker-compose --env-file "$no_env" -f "$COMPOSE_FILE" config -q 2>&1); then
        fail compose "$COMPOSE_FILE starts without GRAFANA_ADMIN_PASSWORD (must refuse)"
    elif grep -q 'GRAFANA_ADMIN_PASSWORD' <<<"$out"; then
        pass "compose: refuses to start without GRAFANA_ADMIN_PASSWORD"
    else
        fail compose "compose failed without GRAFANA_ADMIN_PASSWORD, but not because of it:"$'\n'"$out"
    fi
    # REDIS_PASSWORD reaches Redis (--requirepass), the gateway's REDIS_URL and
    # the exporter.
    if out=$("${compose[@]}" config 2>&1) &&
        grep -q 'requirepass' <<<"$out" &&
        grep -q 'REDIS_URL: redis://:validate-placeholder@redis:6379' <<<"$out" &&
        [ "$(grep -c 'REDIS_PASSWORD: validate-placeholder' <<<"$out")" -ge 2 ]; then
        pass "compose: REDIS_PASSWORD wired into redis, REDIS_URL and the exporter"
    else
        fail compose "REDIS_PASSWORD is not wired into redis (--requirepass), the gateway's REDIS_URL and redis-exporter"
    fi
    local f
    for f in deploy/nginx/nginx.conf deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml \
        deploy/grafana/provisioning deploy/grafana/dashboards; do
        if ! grep -q "\./$f:" "$COMPOSE_FILE"; then
            fail compose "$COMPOSE_FILE does not mount ./$f"
        fi
    done
    # TLS at the edge: nginx gets a certificate (the operator's, or tls-init's) and only
    # nginx publishes client ports; the gateways serve /metrics on their internal port.
    if out=$("${compose[@]}" config 2>&1) && printf '%s\n' "$out" >"$WORK/compose-config.yml" &&
        out=$("$PYTHON" - "$WORK/compose-config.yml" 2>&1 <<'PY'
import sys

import yaml

services = yaml.safe_load(open(sys.argv[1]))["services"]
nginx, gateway = services["nginx"], services["gateway"]
def port(p):
    # "[ip:]published:target[/proto]" or the long form, as compose versions print them.
    if isinstance(p, str):
        return p.split("/")[0]
    return f"{p['host_ip'] + ':' if p.get('host_ip') else ''}{p['published']}:{p['target']}"
ports = {port(p) for p in nginx["ports"]}
assert any(p.endswith(":443") for p in ports), f"nginx publishes no TLS port: {ports}"
assert any(p.startswith("127.0.0.1:") and p.endswith(":8081") for p in ports), f"internal port not on loopback only: {ports}"
assert any(str(v).endswith(":/etc/nginx/tls:ro") or (isinstance(v, dict) and v.get("target") == "/etc/nginx/tls")
           for v in nginx["volumes"]), "nginx does not mount the TLS directory"
assert nginx["depends_on"]["tls-init"]["condition"] == "service_completed_successfully", "nginx must wait for tls-init"
assert services["tls-init"]["build"]["target"] == "tls-init", "tls-init builds the Dockerfile's tls-init stage"
assert gateway["environment"]["GATEWAY_INTERNAL_LISTEN"] == "0.0.0.0:9091", "gateways need an internal listener"
assert "ports" not in gateway, "gateways publish no port"
PY
    ); then
        pass "compose: nginx terminates TLS (tls-init when no certificate), internal port on loopback, gateways' metrics internal"
    else
        fail compose "TLS or the internal listener is not wired as expected:"$'\n'"$out"
    fi
    check_session_secret "$WORK/compose-config.yml"
}

# check_session_secret CONFIG: every replica reads the file the session-secret service
# writes, and that service's script (run here on a scratch directory) makes one secret,
# keeps it across starts and takes GATEWAY_SESSION_SECRET when given.
check_session_secret() {
    local config=$1 script dir first
    if ! script=$("$PYTHON" - "$config" <<'PY'
import sys

import yaml

services = yaml.safe_load(open(sys.argv[1]))["services"]
init, gateway = services["session-secret"], services["gateway"]
mount = next(v for v in gateway["volumes"]
             if (v.get("source") if isinstance(v, dict) else v.split(":")[0]) == "session-secret")
target = mount["target"] if isinstance(mount, dict) else mount.split(":")[1]
assert gateway["environment"]["GATEWAY_SESSION_SECRET_FILE"] == f"{target}/session-secret", \
    "GATEWAY_SESSION_SECRET_FILE is not the mounted session-secret file"
assert gateway["depends_on"]["session-secret"]["condition"] == "service_completed_successfully", \
    "the gateways must wait for session-secret"
assert "GATEWAY_SESSION_SECRET" not in gateway["environment"], "the gateways read the file only"
# `config` prints the file's `$$` escapes as they are.
print(init["command"][0].replace("$$", "$"))
PY
    ); then
        fail compose "the session secret is not wired as expected:"$'\n'"$script"
        return
    fi
    dir=$(mktemp -d "$WORK/secret.XXXXXX")
    script=${script//\/secrets\//$dir\/}
    # Ownership for the image's user needs root; a developer's run checks the rest.
    [ "$(id -u)" -eq 0 ] || script=${script//chown /: }
    # Run from the scratch directory, so a script gone wrong writes nothing elsewhere.
    if ! (cd "$dir" && env -u GATEWAY_SESSION_SECRET sh -euc "$script") ||
        ! first=$(cat "$dir/session-secret") || ! [[ $first =~ ^[0-9a-f]{64}$ ]]; then
        fail compose "session-secret did not write a 32-byte hex secret"
        return
    fi
    (cd "$dir" && env -u GATEWAY_SESSION_SECRET sh -euc "$script")
    if [ "$(cat "$dir/session-secret")" != "$first" ]; then
        fail compose "session-secret replaced an existing secret"
        return
    fi
    (cd "$dir" && GATEWAY_SESSION_SECRET=operator-chosen-secret-of-at-least-32-bytes sh -euc "$script")
    if [ "$(cat "$dir/session-secret")" != operator-chosen-secret-of-at-least-32-bytes ]; then
        fail compose "session-secret ignored GATEWAY_SESSION_SECRET"
        return
    fi
    if [ "$(id -u)" -eq 0 ] && [ "$(stat -c %u:%a "$dir/session-secret")" != 10001:400 ]; then
        fail compose "the session secret is not readable by the image's user (10001) alone"
        return
    fi
    pass "compose: one session secret for every replica (made once, or GATEWAY_SESSION_SECRET)"
}

# ---------------------------------------------------------------------------
check_dockerfile() {
    local ok=1 src members m
    # Every local COPY source must exist and survive .dockerignore.
    while read -r src; do
        if [ ! -e "$src" ]; then
            fail dockerfile "Dockerfile copies '$src', which does not exist"
            ok=0
        fi
    done < <(sed -n 's/^COPY[[:space:]]\{1,\}\([^-][^[:space:]]*\)[[:space:]].*/\1/p' Dockerfile)
    # From `members = [` up to the first `]`, which may close on the same line.
    members=$(awk '/^members[[:space:]]*=/ { on = 1 } on { print } on && /]/ { exit }' Cargo.toml |
        grep -o '"[^"]*"' | tr -d '"')
    for m in $members; do
        if ! grep -Eq "^COPY[[:space:]]+$m/Cargo.toml[[:space:]]" Dockerfile; then
            fail dockerfile "workspace member '$m' has no 'COPY $m/Cargo.toml' in the dependency layer"
            ok=0
        fi
    done
    # Only ignore patterns that would hide a build input matter here.
    if grep -Eqx '(gateway|Cargo\.(toml|lock)|deploy/docker)' .dockerignore; then
        fail dockerfile ".dockerignore excludes a build input"
        ok=0
    fi
    local directive
    for directive in '^HEALTHCHECK ' '^STOPSIGNAL SIGTERM$' '^EXPOSE 8080$' '^USER [^r0]'; do
        if ! grep -Eq "$directive" Dockerfile; then
            fail dockerfile "Dockerfile lacks a line matching '$directive' (healthcheck, SIGTERM, port 8080, non-root user)"
            ok=0
        fi
    done

    # The dependency layer: stubs for all members + the real lockfile must
    # form a loadable workspace under --locked.
    if command -v cargo >/dev/null 2>&1; then
        local ws="$WORK/workspace" out
        mkdir -p "$ws"
        cp Cargo.toml Cargo.lock "$ws/"
        for m in $members; do
            mkdir -p "$ws/$m"
            cp "$m/Cargo.toml" "$ws/$m/"
        done
        # shellcheck disable=SC2086
        if out=$(cd "$ws" && sh "$REPO_ROOT/deploy/docker/stub-workspace.sh" $members 2>&1 &&
            cargo metadata --locked --format-version 1 2>&1 >/dev/null); then
            pass "Dockerfile: stubbed workspace loads with --locked"
        else
            fail dockerfile "stubbed workspace does not load:"$'\n'"$out"
            ok=0
        fi
    fi
    [ "$ok" = 1 ] && pass "Dockerfile: inputs present, all $(wc -w <<<"$members") member manifests copied"
    return 0
}

# ---------------------------------------------------------------------------
check_scripts() {
    if command -v shellcheck >/dev/null 2>&1; then
        local out
        if out=$(shellcheck -x deploy/local/cluster.sh deploy/local/render.sh deploy/validate.sh \
            deploy/docker/*.sh deploy/kubernetes/validate.sh loadtest/*.sh scripts/*.sh 2>&1); then
            pass "shellcheck: deploy, load test and CI scripts"
        else
            fail scripts "$out"
        fi
    else
        echo "skip  shellcheck not installed (apt-get install -y shellcheck)"
    fi
}

check_nginx
check_prometheus
check_grafana
check_compose
check_dockerfile
check_scripts

if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "validate: FAILED (${FAILED[*]})" >&2
    exit 1
fi
echo "validate: all checks passed"
