#!/usr/bin/env bash
# Validates the shipped deployment files without Docker:
#   nginx       `nginx -t` on deploy/nginx/nginx.conf, as compose runs it and as
#               deploy/local/cluster.sh renders it
#   prometheus  `promtool check config` on both variants of prometheus.yml
#   grafana     provisioning YAML and dashboard JSON parse; every dashboard
#               query is valid PromQL (`promtool check rules`)
#   compose     `docker-compose config -q` (and `docker compose` when present)
#   Dockerfile  build inputs exist, every workspace member's manifest is
#               copied, the stubbed workspace loads with --locked
#   scripts     shellcheck, when installed
# Missing Debian tools (nginx, promtool, docker-compose) are installed with
# apt-get when running as root. Exits non-zero if anything fails.
set -euo pipefail

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
# shellcheck source=deploy/local/render.sh
. deploy/local/render.sh

NGINX_CONF=deploy/nginx/nginx.conf
PROM_CONF=deploy/prometheus/prometheus.yml
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
    elif ! grep -Eq '^[[:space:]]*resolver[[:space:]]+127\.0\.0\.11[[:space:]].*valid=' "$NGINX_CONF"; then
        fail nginx "$NGINX_CONF: Docker DNS resolver 127.0.0.11 with valid= missing"
    else
        pass "nginx: upstream without stickiness, replicas re-resolved via 127.0.0.11"
    fi
    # The server API never reaches the public chat origin by default.
    local api
    api=$(sed -n '/^[[:space:]]*location[[:space:]]\/api\/[[:space:]]*{/,/^[[:space:]]*}/p' "$NGINX_CONF")
    if [ -z "$api" ]; then
        fail nginx "$NGINX_CONF: no 'location /api/': the server API would be public"
    elif grep -Eq '^[[:space:]]*allow[[:space:]]' <<<"$api" ||
        ! grep -Eq '^[[:space:]]*deny[[:space:]]+all;' <<<"$api"; then
        fail nginx "$NGINX_CONF: /api/ must be denied to all and allowed to no network by default"
    else
        pass "nginx: /api/ refused to every network until the operator names one"
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
    local compose_conf="$WORK/nginx-compose.conf"
    if version_ge "$version" 1.27.3; then
        sed "s|/var/cache/nginx|$prefix/temp|" "$NGINX_CONF" >"$compose_conf"
    else
        render_nginx "$NGINX_CONF" "$compose_conf" 80 "$prefix/temp" 127.0.0.1:8080
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
    if CLUSTER_API_ALLOW="10.20.0.0/16 127.0.0.2" render_nginx "$NGINX_CONF" "$native_conf" 127.0.0.1:8080 "$prefix/temp" \
        127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083 &&
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
    local native="$WORK/prometheus-native.yml"
    if render_prometheus "$PROM_CONF" "$native" 127.0.0.1:9090 127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083 &&
        out=$(promtool check config "$native" 2>&1); then
        pass "promtool check config: native cluster variant"
    else
        fail prometheus "native cluster variant invalid:"$'\n'"${out:-render failed}"
    fi
}

# ---------------------------------------------------------------------------
check_grafana() {
    local out rules="$WORK/dashboard-rules.yml"
    if out=$("$PYTHON" - "$GRAFANA_PROVISIONING" "$DASHBOARD_DIR" "$rules" 2>&1 <<'PY'
import glob, json, os, sys

import yaml

prov, dash_dir, rules_path = sys.argv[1:4]
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
print(f"{len(dashboards)} dashboard(s), {len(rules)} queries")
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
    local out
    if out=$(docker-compose -f "$COMPOSE_FILE" config -q 2>&1); then
        pass "docker-compose config -q"
    else
        fail compose "$out"
    fi
    if out=$(docker-compose -f "$COMPOSE_FILE" --profile loadtest config -q 2>&1); then
        pass "docker-compose --profile loadtest config -q"
    else
        fail compose "$out"
    fi
    if out=$(docker-compose -f "$COMPOSE_FILE" -f deploy/compose/redis-cluster.yml config -q 2>&1); then
        pass "docker-compose config -q with the Redis Cluster override"
    else
        fail compose "$out"
    fi
    if docker compose version >/dev/null 2>&1; then
        if out=$(docker compose -f "$COMPOSE_FILE" config -q 2>&1); then
            pass "docker compose config -q"
        else
            fail compose "$out"
        fi
    fi
    local f
    for f in deploy/nginx/nginx.conf deploy/prometheus/prometheus.yml \
        deploy/grafana/provisioning deploy/grafana/dashboards; do
        if ! grep -q "\./$f:" "$COMPOSE_FILE"; then
            fail compose "$COMPOSE_FILE does not mount ./$f"
        fi
    done
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
            deploy/docker/*.sh 2>&1); then
            pass "shellcheck: deploy scripts"
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
