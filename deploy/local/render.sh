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
# CLUSTER_API_ALLOW (environment): networks (addresses or CIDRs, separated by
# spaces or commas) that may reach /api/ through nginx; each becomes an
# `allow` line at the tagged `api-allow` line. Empty or unset: none may.
render_nginx() {
    local src=$1 dst=$2 listen=$3 temp_dir=$4
    shift 4
    if [ "$#" -eq 0 ]; then
        echo "render_nginx: no upstream addresses" >&2
        return 1
    fi
    awk -v listen="$listen" -v temp_dir="$temp_dir" -v addrs="$*" \
        -v api_allow="${CLUSTER_API_ALLOW:-}" '
        BEGIN { n_addrs = split(addrs, addr, " ") }
        /# cluster: api-allow/ {
            indent = $0; sub(/#.*/, "", indent)
            n_nets = split(api_allow, net, /[ ,]+/)
            for (i = 1; i <= n_nets; i++) {
                if (net[i] == "") { continue }
                if (net[i] !~ /^[0-9A-Fa-f.:\/]+$/) { bad = 1; continue }
                print indent "allow " net[i] ";"
            }
            n_api++
            next
        }
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
            if (bad || !seen_begin || !seen_end || n_listen != 1 || n_temp < 1 || n_api != 1) {
                print "render_nginx: tagged lines missing or malformed in template" > "/dev/stderr"
                exit 1
            }
        }
    ' "$src" >"$dst.tmp" && mv "$dst.tmp" "$dst"
}

# render_prometheus SRC DST SELF_ADDR TARGET...
#   SELF_ADDR  Prometheus' own host:port (tagged `self` line)
#   TARGET...  gateway nodes as host:port; they replace the tagged
#              service-discovery block with static targets.
render_prometheus() {
    local src=$1 dst=$2 self=$3
    shift 3
    if [ "$#" -eq 0 ]; then
        echo "render_prometheus: no targets" >&2
        return 1
    fi
    local targets="" t
    for t in "$@"; do
        targets="${targets:+$targets, }\"$t\""
    done
    awk -v self="$self" -v targets="$targets" '
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
        /# cluster: self/ {
            if (sub(/targets:[ \t]*\[[^]]*\]/, "targets: [\"" self "\"]") == 1) { n_self++ }
        }
        { print }
        END {
            if (!seen_begin || !seen_end || n_self != 1) {
                print "render_prometheus: tagged lines missing or malformed in template" > "/dev/stderr"
                exit 1
            }
        }
    ' "$src" >"$dst.tmp" && mv "$dst.tmp" "$dst"
}
