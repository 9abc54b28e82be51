#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs with --enable-supernode-auth.
#
#   deploy/register-node-keys.sh CONNECTION KEY.pub...
#
# CONNECTION is a SuperLink connection name from $FLWR_HOME/config.toml (default ~/.flwr/config.toml),
# e.g. [superlink.fedsq-tls]. Each key is registered with
#     flwr supernode register KEY.pub CONNECTION --name <KEY file name without .pub>
# and the node ID the SuperLink assigned is printed. A key that is already registered makes the SuperLink
# refuse the request; the script reports it and carries on, and exits 1 at the end if anything failed.
# Check the result with: flwr supernode list CONNECTION
#
# Set FLWR to the flwr executable to use (default: .venv/bin/flwr of this checkout if present, else flwr).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
connection="$1"; shift

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
flwr_bin="${FLWR:-}"
if [ -z "$flwr_bin" ]; then
  if [ -x "$script_dir/../.venv/bin/flwr" ]; then flwr_bin="$script_dir/../.venv/bin/flwr"; else flwr_bin=flwr; fi
fi
command -v "$flwr_bin" >/dev/null 2>&1 || { echo "register-node-keys.sh: '$flwr_bin' not found (set FLWR=...)" >&2; exit 1; }

status=0
for pub in "$@"; do
  name="$(basename "$pub" .pub)"
  if [ ! -f "$pub" ]; then echo "register-node-keys.sh: $pub: no such file" >&2; status=1; continue; fi
  if out="$("$flwr_bin" supernode register "$pub" "$connection" --name "$name" --format json 2>&1)"; then
    node_id="$(printf '%s\n' "$out" | sed -n 's/.*"node-id": *\([0-9]*\).*/\1/p' | head -n1)"
    if [ -n "$node_id" ]; then
      echo "register-node-keys.sh: $name registered, node ID $node_id"
      continue
    fi
  fi
  echo "register-node-keys.sh: registering $pub failed:" >&2
  printf '%s\n' "$out" >&2
  status=1
done
exit "$status"
