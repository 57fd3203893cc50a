#!/bin/sh
# Makes nginx's TLS certificate when the operator supplied none: writes
# DIR/tls.crt and DIR/tls.key (a self-signed P-256 certificate for the given
# host names and addresses, valid for a year), and leaves both alone when they
# exist already, so a real certificate put there is never overwritten.
#
#   self-signed-cert.sh DIR [NAME_OR_IP ...]     (default: localhost 127.0.0.1)
#
# Run by the compose service `tls-init` and by deploy/local/cluster.sh. Clients
# must be told to trust tls.crt itself (it is its own issuer), e.g.
# `curl --cacert tls.crt`, SSL_CERT_FILE for k6, or the browser's exception.
set -eu

dir=${1:?usage: self-signed-cert.sh DIR [NAME_OR_IP ...]}
shift
[ "$#" -gt 0 ] || set -- localhost 127.0.0.1

if [ -s "$dir/tls.crt" ] && [ -s "$dir/tls.key" ]; then
    echo "self-signed-cert: $dir/tls.crt exists, keeping it"
    exit 0
fi
if [ -e "$dir/tls.crt" ] || [ -e "$dir/tls.key" ]; then
    echo "self-signed-cert: only one of $dir/tls.crt and $dir/tls.key exists; supply both or neither" >&2
    exit 1
fi

san=""
for name in "$@"; do
    case $name in
        *[!0-9.]*) entry="DNS:$name" ;; # not a dotted quad: a host name
        *) entry="IP:$name" ;;
    esac
    san="${san:+$san,}$entry"
done

mkdir -p "$dir"
umask 077
# A leaf certificate (CA:FALSE) that is its own issuer: TLS clients that check
# the chain (rustls, Go, browsers) accept it once tls.crt is their trust root.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 365 -subj "/CN=$1" \
    -addext "subjectAltName=$san" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$dir/tls.key.tmp" -out "$dir/tls.crt.tmp" 2>/dev/null
# The certificate is public; nginx's master process reads the key before it
# drops privileges, so the key stays readable by its owner only.
chmod 644 "$dir/tls.crt.tmp"
mv "$dir/tls.key.tmp" "$dir/tls.key"
mv "$dir/tls.crt.tmp" "$dir/tls.crt"
echo "self-signed-cert: wrote $dir/tls.crt for $*"
