# shellcheck shell=bash
# Renders the shipped deploy/ configs for the native cluster by rewriting the
# lines tagged "cluster:" (addresses and paths only). Sourced by
# deploy/local/cluster.sh and deploy/validate.sh.

# render_nginx SRC DST KEY=VALUE...
#   https=ADDR        the public TLS listener (tagged `listen https`)
#   http=ADDR         the plain listener that redirects (tagged `listen http`)
#   internal=ADDR     the internal listener (tagged `listen internal`)
#   redirect_port=P   the https port the redirect names (443: none)
#   cert=FILE key=FILE  the TLS certificate and key
#   temp=DIR          replaces the /var/cache/nginx prefix of the temp paths
#   servers="A..."    the nodes' public host:port, one upstream `server` each
#   internal_servers="A..."  the same nodes' internal listeners
# Every key is required. The parameters of each upstream's template `server`
# line are kept, except `resolve`, which only applies to DNS names.
render_nginx() {
    local src=$1 dst=$2 arg
    shift 2
    local https="" http="" internal="" redirect_port="" cert="" key="" temp="" servers="" internal_servers=""
    for arg in "$@"; do
        case $arg in
            https=* | http=* | internal=* | redirect_port=* | cert=* | key=* | temp=* | servers=* | internal_servers=*)
                printf -v "${arg%%=*}" '%s' "${arg#*=}" ;;
            *) echo "render_nginx: unknown argument '$arg'" >&2; return 1 ;;
        esac
    done
    for arg in https http internal redirect_port cert key temp servers internal_servers; do
        if [ -z "${!arg}" ]; then
            echo "render_nginx: $arg= missing" >&2
            return 1
        fi
    done
    awk -v https="$https" -v http="$http" -v internal="$internal" -v redirect_port="$redirect_port" \
        -v cert="$cert" -v key="$key" -v temp_dir="$temp" \
        -v servers="$servers" -v internal_servers="$internal_servers" '
        function upstream(addrs,    n, addr, i, line) {
            n = split(addrs, addr, " ")
            for (i = 1; i <= n; i++) {
                line = template
                sub(/server[ \t]+[^ \t;]+/, "server " addr[i], line)
                gsub(/[ \t]+resolve([ \t]|;)/, " ", line)
                sub(/[ \t]*;/, ";", line)
                sub(/;[ \t]*;/, ";", line)
                print line
            }
        }
        /# cluster: (internal )?servers begin/ {
            block = ($3 == "internal") ? "internal" : "public"
            template = ""; seen[block "-begin"] = 1; print; next
        }
        /# cluster: (internal )?servers end/ {
            if (block == "" || template == "") { bad = 1 }
            upstream(block == "internal" ? internal_servers : servers)
            seen[block "-end"] = 1; block = ""; print; next
        }
        block != "" {
            if ($1 == "server" && template == "") { template = $0 }
            next
        }
        /# cluster: listen https$/ { n["https"] += sub(/listen[ \t]+[^ ;]+/, "listen " https) }
        /# cluster: listen http$/ { n["http"] += sub(/listen[ \t]+[^;]*;/, "listen " http ";") }
        /# cluster: listen internal$/ { n["internal"] += sub(/listen[ \t]+[^;]*;/, "listen " internal ";") }
        /# cluster: certificate$/ { n["cert"] += sub(/ssl_certificate[ \t]+[^;]*;/, "ssl_certificate " cert ";") }
        /# cluster: certificate-key$/ { n["key"] += sub(/ssl_certificate_key[ \t]+[^;]*;/, "ssl_certificate_key " key ";") }
        /# cluster: redirect$/ {
            n["redirect"] += sub(/:8443\$request_uri/, (redirect_port == 443 ? "" : ":" redirect_port) "$request_uri")
        }
        /# cluster: temp$/ { n["temp"] += sub(/\/var\/cache\/nginx/, temp_dir) }
        { print }
        END {
            split("https http internal cert key redirect", one, " ")
            for (i in one) { if (n[one[i]] != 1) { bad = 1 } }
            if (n["temp"] < 1) { bad = 1 }
            split("public-begin public-end internal-begin internal-end", blocks, " ")
            for (i in blocks) { if (!seen[blocks[i]]) { bad = 1 } }
            if (bad) {
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
