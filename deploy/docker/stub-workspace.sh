#!/bin/sh
# Creates placeholder sources for every workspace member so that
# `cargo build` can compile the dependencies before the real sources are
# copied in (keeps the dependency layer cached until a manifest or
# Cargo.lock changes).
#
# usage: stub-workspace.sh MEMBER_DIR...
# For each member: src/main.rs and src/lib.rs, plus every `path = "*.rs"`
# target named in its Cargo.toml ([lib], [[bin]], [[bench]], ...); a
# `fn main` in a library stub only costs a dead-code warning.
set -eu

# stub FILE [CONTENT]: create FILE unless it exists (default: an empty main).
stub() {
    if [ ! -e "$1" ]; then
        mkdir -p "$(dirname "$1")"
        printf '%s\n' "${2:-fn main() {\}}" >"$1"
    fi
}

for member in "$@"; do
    manifest="$member/Cargo.toml"
    [ -f "$manifest" ] || { echo "stub-workspace: $manifest not found" >&2; exit 1; }
    stub "$member/src/main.rs"
    stub "$member/src/lib.rs" "// placeholder library target"
    sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\([^"]*\.rs\)".*/\1/p' "$manifest" |
        while IFS= read -r target; do
            stub "$member/$target"
        done
done
