#!/usr/bin/env bash
# Make one EC key pair per SuperNode, in the OpenSSH format Flower expects for SuperNode authentication.
#
#   deploy/make-node-keys.sh [--out DIR] [--force] NAME...
#   deploy/make-node-keys.sh [--out DIR] [--force] --count N        # names silo-1 .. silo-N
#
# For every NAME it writes into DIR (default: $FEDSQ_KEYS_DIR, else deploy/keys next to this script):
#   NAME        the private key (ECDSA P-384, "-----BEGIN OPENSSH PRIVATE KEY-----"): stays on that silo,
#               passed as `flower-supernode --auth-supernode-private-key DIR/NAME`
#   NAME.pub    the public key ("ecdsa-sha2-nistp384 AAAA... NAME"): goes to whoever runs the flwr CLI,
#               who registers it with the SuperLink:
#                   flwr supernode register DIR/NAME.pub <connection> --name NAME
#               (deploy/register-node-keys.sh <connection> DIR/*.pub does that for several keys)
#
# Best practice: each silo runs this script itself, keeps NAME and sends only NAME.pub to the coordinator.
# Uses ssh-keygen; without it, falls back to Python's `cryptography` package (installed with flwr).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${FEDSQ_KEYS_DIR:-$script_dir/keys}"  # or --out; keep keys outside a read-only checkout
force=0
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --count)
      count="${2:?--count needs a number}"; shift 2
      for i in $(seq 1 "$count"); do names+=("silo-$i"); done ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "make-node-keys.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
[ "${#names[@]}" -gt 0 ] || { echo "make-node-keys.sh: give at least one NAME or --count N (see --help)" >&2; exit 2; }

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in "$script_dir/../.venv/bin/python" python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi

make_key_python() {  # $1 = private key path, $2 = comment
  "$python_bin" - "$1" "$2" <<'EOF'
import os, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, comment = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as handle:
    handle.write(private)
with open(path + ".pub", "wb") as handle:
    handle.write(public + b" " + comment.encode() + b"\n")
EOF
}

mkdir -p "$out"
for name in "${names[@]}"; do
  if [[ ! "$name" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "make-node-keys.sh: '$name' is not a plain file name ([A-Za-z0-9._-])" >&2; exit 2
  fi
  key="$out/$name"
  if [ -e "$key" ] || [ -e "$key.pub" ]; then
    if [ "$force" -eq 1 ]; then rm -f "$key" "$key.pub"
    else echo "make-node-keys.sh: $key exists; pass --force to replace it (then register the new .pub)" >&2; exit 1; fi
  fi
  if command -v ssh-keygen >/dev/null 2>&1; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$key"
  elif [ -n "$python_bin" ]; then
    make_key_python "$key" "$name"
  else
    echo "make-node-keys.sh: need ssh-keygen or python3 with the 'cryptography' package" >&2; exit 1
  fi
  chmod 600 "$key"
  chmod 644 "$key.pub"
  echo "make-node-keys.sh: wrote $key (private, stays on the silo) and $key.pub (register it)"
done
