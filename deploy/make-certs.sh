#!/usr/bin/env bash
# Make a demo certificate authority and a SuperLink server certificate (TLS for Flower 1.42).
#
#   deploy/make-certs.sh [--out DIR] [--host NAME]... [--days N] [--force]
#
# Writes into DIR (default: $FEDSQ_CERTS_DIR, else deploy/certs next to this script):
#   ca.crt      the demo CA certificate: give it to every SuperNode (--root-certificates) and to the
#               user's machine (root-certificates = ... in $FLWR_HOME/config.toml); it is public
#   ca.key      the CA's private key: keep it on the machine that made the certificates, never copy it
#   server.pem  the SuperLink certificate (--ssl-certfile), signed by ca.crt
#   server.key  the SuperLink private key (--ssl-keyfile): only the coordinator machine needs it
#
# The server certificate's subjectAltName always covers localhost, 127.0.0.1, ::1 and `superlink` (the
# Docker compose service name), plus every --host given (an IPv4/IPv6 address becomes an IP SAN, anything
# else a DNS SAN). 127.0.0.1 is required even for remote use: with --host 0.0.0.0 the SuperLink's own
# SuperExec connects back to 127.0.0.1 and verifies this certificate.
#
# These are DEMO certificates (self-made CA, unencrypted keys). For a real deployment use your
# organisation's CA; Flower only needs the three files above.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${FEDSQ_CERTS_DIR:-$script_dir/certs}"  # or --out; keep certificates outside a read-only checkout
days=365
force=0
hosts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --host) hosts+=("${2:?--host needs a name or address}"); shift 2 ;;
    --host=*) hosts+=("${1#--host=}"); shift ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "make-certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
# SUPERLINK_HOSTS="a.example.org 10.0.0.5" adds more names (used by docker/certs.yml).
for extra in ${SUPERLINK_HOSTS:-}; do hosts+=("$extra"); done

command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found" >&2; exit 1; }

mkdir -p "$out"
if [ "$force" -eq 0 ] && { [ -e "$out/ca.crt" ] || [ -e "$out/server.pem" ]; }; then
  echo "make-certs.sh: $out already holds certificates; pass --force to replace them" \
       "(every SuperNode and user then needs the new ca.crt)" >&2
  exit 1
fi

# subjectAltName entries, de-duplicated, IP vs DNS decided per entry.
declare -A seen=()
san=()
add_san() {
  local name="$1" kind
  [ -n "$name" ] || return 0
  [ -z "${seen[$name]:-}" ] || return 0
  seen[$name]=1
  if [[ "$name" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || [[ "$name" == *:* ]]; then kind=IP; else kind=DNS; fi
  san+=("$kind:$name")
}
for name in localhost 127.0.0.1 ::1 superlink "${hosts[@]+"${hosts[@]}"}"; do add_san "$name"; done
san_line="$(IFS=,; echo "${san[*]}")"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
umask 077  # private keys readable by the owner only

cat > "$tmp/server.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = superlink
O = fedsq demo
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san_line
EOF

openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedsq demo CA/O=fedsq demo" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey rsa:3072 -sha256 -nodes -keyout "$out/server.key" -out "$tmp/server.csr" \
  -config "$tmp/server.cnf" 2>/dev/null
openssl x509 -req -sha256 -days "$days" -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -CAserial "$tmp/ca.srl" -out "$out/server.pem" \
  -extfile "$tmp/server.cnf" -extensions v3_server 2>/dev/null
chmod 644 "$out/ca.crt" "$out/server.pem"
chmod 600 "$out/ca.key" "$out/server.key"

openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "make-certs.sh: wrote $out/{ca.crt,ca.key,server.pem,server.key} (valid $days days)"
echo "make-certs.sh: SuperLink certificate subjectAltName = $san_line"
