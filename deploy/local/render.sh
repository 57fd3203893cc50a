# shellcheck shell=bash
# Renders the shipped deploy/ configs for the native cluster by rewriting the
# lines tagged "cluster:" (addresses and paths only). Sourced by
# deploy/local/cluster.sh and deploy/validate.sh.

# render_nginx SRC DST LISTEN TEMP_DIR ADDR...
#   LISTEN    value for the tagged `listen` line (e.g. 127.0.0.1:8080)
#   TEMP_DIR  replaces the /var/cache/nginx prefix of the tagged temp paths
#   ADDR...   one upstream `server` line per address (host:port); the
#             parameters of the template line are kept, except `resolve`,
#             which only applies to DNS names.
render_nginx() {
    local src=$1 dst=$2 listen=$3 temp_dir=$4
    shift 4
    if [ "$#" -eq 0 ]; then
        echo "render_nginx: no upstream addresses" >&2
        return 1
    fi
    awk -v listen="$listen" -v temp_dir="$temp_dir" -v addrs="$*" '
        BEGIN { n_addrs = split(addrs, addr, " ") }
        /# cluster: servers begin/ { in_block = 1; seen_begin = 1; print; next }
        /# cluster: servers end/ {
            if (!in_block || template == "") { bad = 1 }
            for (i = 1; i <= n_addrs; i++) {
                line = template
                sub(/server[ \t]+[^ \t;]+/, "server " addr[i], line)
                gsub(/[ \t]+resolve([ \t]|;)/, " ", line)
                sub(/[ \t]*;/, ";", line)
                sub(/;[ \t]*;/, ";", line)
                print line
            }
            in_block = 0; seen_end = 1; print; next
        }
        in_block {
            if ($1 == "server" && template == "") { template = $0 }
            next
        }
        /# cluster: listen/ {
            if (sub(/listen[ \t]+[^;]*;/, "listen " listen ";") == 1) { n_listen++ }
        }
        /# cluster: temp/ {
            if (sub(/\/var\/cache\/nginx/, temp_dir) == 1) { n_temp++ }
        }
        { print }
        END {
            if (bad || !seen_begin || !seen_end || n_listen != 1 || n_temp < 1) {
                print "render_nginx: tagged lines missing or malformed in template" > "/dev/stderr"
                exit 1
            }
        }
    ' "$src" >"$dst.tmp" && mv "$dst.tmp" "$dst"
}

# render_prometheus SRC DST SELF_ADDR EXPORTER_ADDR TARGET...
#   SELF_ADDR      Prometheus' own host:port (tagged `self` line)
#   EXPORTER_ADDR  the Redis exporter's host:port for the tagged exporter
#                  job, or "" to drop that job (no exporter running)
#   TARGET...      gateway nodes as host:port; they replace the tagged
#                  service-discovery block with static targets.
# The rule files named under `rule_files:` (paths relative to SRC) are copied
# next to DST, so the rendered config finds them the same way.
render_prometheus() {
    local src=$1 dst=$2 self=$3 exporter=$4
    shift 4
    if [ "$#" -eq 0 ]; then
        echo "render_prometheus: no targets" >&2
        return 1
    fi
    local targets="" t
    for t in "$@"; do
        targets="${targets:+$targets, }\"$t\""
    done
    awk -v self="$self" -v targets="$targets" -v exporter="$exporter" '
        /# cluster: targets begin/ {
            in_block = 1; seen_begin = 1
            indent = $0; sub(/#.*/, "", indent)
            print
            print indent "static_configs:"
            print indent "  - targets: [" targets "]"
            next
        }
        /# cluster: targets end/ { in_block = 0; seen_end = 1; print; next }
        in_block { next }
        /# cluster: redis-exporter begin/ { in_exporter = 1; seen_exporter_begin = 1; print; next }
        /# cluster: redis-exporter end/ { in_exporter = 0; seen_exporter_end = 1; print; next }
        in_exporter && exporter == "" { next }
        in_exporter && /# cluster: redis-exporter$/ {
            if (sub(/targets:[ \t]*\[[^]]*\]/, "targets: [\"" exporter "\"]") == 1) { n_exporter++ }
        }
        /# cluster: self/ {
            if (sub(/targets:[ \t]*\[[^]]*\]/, "targets: [\"" self "\"]") == 1) { n_self++ }
        }
        { print }
        END {
            if (!seen_begin || !seen_end || n_self != 1 ||
                !seen_exporter_begin || !seen_exporter_end || (exporter != "" && n_exporter != 1)) {
                print "render_prometheus: tagged lines missing or malformed in template" > "/dev/stderr"
                exit 1
            }
        }
    ' "$src" >"$dst.tmp" && mv "$dst.tmp" "$dst" || return 1

    local src_dir dst_dir rule
    src_dir=$(dirname -- "$src")
    dst_dir=$(dirname -- "$dst")
    while IFS= read -r rule; do
        [ -n "$rule" ] || continue
        case $rule in
            /*) continue ;; # absolute: found as it is
        esac
        if [ ! -f "$src_dir/$rule" ]; then
            echo "render_prometheus: rule file $src_dir/$rule not found" >&2
            return 1
        fi
        if [ "$(cd -- "$src_dir" && pwd -P)" != "$(cd -- "$dst_dir" && pwd -P)" ]; then
            mkdir -p -- "$(dirname -- "$dst_dir/$rule")"
            cp -- "$src_dir/$rule" "$dst_dir/$rule"
        fi
    done < <(awk '
        /^rule_files:/ { on = 1; next }
        on && /^[^ \t#]/ { on = 0 }
        on && /^[ \t]*-[ \t]/ { sub(/^[ \t]*-[ \t]*/, ""); sub(/[ \t]*(#.*)?$/, ""); gsub(/"/, ""); print }
    ' "$src")
}
