#!/usr/bin/env bash
# Measure FedSQ round times in a loopback deployment (TLS + SuperNode auth, 2 SuperNodes) and in a Flower
# simulation with the same app, data split and run config, one after the other on this machine.
# The deployment-vs-simulation benchmark (3 SuperNodes, TLS off, ratio printed, several app versions side by
# side) is `fedsq-perf deploy` (fedsq_app/tools/perf/deploy.py); this script is its TLS + node-auth variant, and
# the recipe for silos with their own data (SILO_NODE_CONFIGS).
#
#   deploy/measure-rounds.sh [RUN_CONFIG_OVERRIDES]
#   deploy/measure-rounds.sh "num-server-rounds=4 max-train-samples=3000 device='cpu'"   # the default
#
# Everything is bound to 127.0.0.1 and lives in a temp dir (kept: its path is printed); every process is
# started in its own process group and stopped by PID on exit. Round times come from each run's
# results.json (`rounds[].wall_time_s`: the ServerApp's wall time per round: send Q, wait for both
# silos' replies, aggregate, central validation). Needs: .venv (bash scripts/setup.sh), openssl.
#
# Environment: SILO_NODE_CONFIGS="cfg1;cfg2" replaces the silos' --node-config (default: partition 0 and 1
# of 2), e.g. "data-path='idx:/srv/a';data-path='idx:/srv/b'" for silos with their own data;
# SKIP_SIM=1 skips the simulation run; PREPARED_CACHE=<dir> copies an already prepared FEDSQ_CACHE_DIR
# instead of running fedsq-prepare (every process must use the same backbone).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
overrides="${1:-num-server-rounds=4 max-train-samples=3000 device='cpu' min-valid-replies=2}"  # two silos
venv="$repo/.venv/bin"
work="$(mktemp -d /tmp/fedsq-measure.XXXXXX)"
export PATH="$venv:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export MPLCONFIGDIR="$work/mpl" HF_HOME="$work/hf" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 UV_CACHE_DIR="$work/uv"
export FEDSQ_CACHE_DIR="$work/cache" RAY_TMPDIR="$work/ray"
# The SuperExec a SuperNode starts looks for work every 1 s by default: 0.1 s takes ~0.5 s off each round.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
mkdir -p "$work"/{logs,ray}

pids=()
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
cleanup() {  # the started processes, their process groups and everything below them (Flower puts its
  local tree=() pid                      # SuperExec and the app processes in groups of their own)
  for pid in "${pids[@]}"; do tree+=("$pid" $(descendants "$pid")); done
  for pid in "${tree[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0; for pid in "${tree[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.2
  done
  for pid in "${tree[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
start() {  # start NAME FLWR_HOME CMD... : own process group, log in $work/logs/NAME.log
  local name="$1" home="$2"; shift 2
  mkdir -p "$home"
  FLWR_HOME="$home" setsid "$@" >"$work/logs/$name.log" 2>&1 &
  pids+=("$!")
}
free_port() { "$venv/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_health() {  # wait_health URL [curl args]
  for _ in $(seq 120); do curl -fs "${@:2}" "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "not healthy: $1" >&2; return 1
}
run_and_wait() {  # run_and_wait CONNECTION RUN_NAME [extra flwr run args] -> prints the run's status
  local conn="$1" name="$2"; shift 2
  local id
  id=$(flwr run . "$conn" --run-config "$overrides out-dir='$work/outputs' run-name='$name'" "$@" --format json |
       "$venv/python" -c 'import json,sys; print(json.load(sys.stdin)["run-id"])')
  flwr log "$id" "$conn" --stream >"$work/logs/$name-run.log" 2>&1 || true
  flwr ls --run-id "$id" "$conn" --format json |
    "$venv/python" -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])'
}

echo "== work dir: $work"
echo "== run config: $overrides"
if [ -n "${PREPARED_CACHE:-}" ]; then cp -r "$PREPARED_CACHE" "$FEDSQ_CACHE_DIR"
else fedsq-prepare >"$work/logs/prepare.log" 2>&1; fi

# --- deployment: TLS + node auth, 2 silos -------------------------------------------------------------
bash deploy/make-certs.sh --out "$work/certs" --days 2 >/dev/null
bash deploy/make-node-keys.sh --out "$work/keys" silo-1 silo-2 >/dev/null
port=$(free_port)
start superlink "$work/home-link" flower-superlink --host 127.0.0.1 --port "$port" --database "$work/state.db" \
  --ssl-ca-certfile "$work/certs/ca.crt" --ssl-certfile "$work/certs/server.pem" \
  --ssl-keyfile "$work/certs/server.key" --enable-supernode-auth --disable-runtime-dependency-installation
wait_health "https://127.0.0.1:$port/health" --cacert "$work/certs/ca.crt"
export FLWR_HOME="$work/home-user"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deploy"

[superlink.deploy]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"

[superlink.sim]
address = "127.0.0.1:SIMPORT"
insecure = true
TOML
FLWR="$venv/flwr" bash deploy/register-node-keys.sh deploy "$work/keys/silo-1.pub" "$work/keys/silo-2.pub" >/dev/null
IFS=';' read -r -a node_configs <<<"${SILO_NODE_CONFIGS:-partition-id=0 num-partitions=2;partition-id=1 num-partitions=2}"
for i in 1 2; do
  start "silo-$i" "$work/home-silo-$i" flower-supernode --superlink "127.0.0.1:$port" \
    --root-certificates "$work/certs/ca.crt" --auth-supernode-private-key "$work/keys/silo-$i" \
    --port "$(free_port)" --node-config "${node_configs[$((i - 1))]}"
done
for _ in $(seq 60); do
  [ "$(flwr supernode list deploy --format json 2>/dev/null | grep -c '"online"')" -ge 2 ] && break
  sleep 1
done
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s.%N)
deploy_status=$(run_and_wait deploy deploy)
deploy_wall=$("$venv/python" -c "import time; print(round(time.time() - $t0, 1))")
load_deploy="$load_before -> $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== deployment run: $deploy_status in ${deploy_wall}s (load $load_deploy)"

# --- simulation: same app, 2 simulated SuperNodes (Ray), 1 CPU each -----------------------------------
sim_status=skipped sim_wall=0
if [ "${SKIP_SIM:-0}" != 1 ]; then
simport=$(free_port)
sed -i "s/SIMPORT/$simport/" "$FLWR_HOME/config.toml"
start sim-superlink "$work/home-sim" flower-superlink --insecure --simulation --host 127.0.0.1 --port "$simport" \
  --disable-runtime-dependency-installation
wait_health "http://127.0.0.1:$simport/health"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s.%N)
sim_status=$(run_and_wait sim sim --federation-config "num-supernodes=2 client-resources-num-cpus=1")
sim_wall=$("$venv/python" -c "import time; print(round(time.time() - $t0, 1))")
load_sim="$load_before -> $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== simulation run: $sim_status in ${sim_wall}s (load $load_sim)"
fi

"$venv/python" - "$work/outputs" "$deploy_wall" "$sim_wall" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, walls = Path(sys.argv[1]), {"deploy": sys.argv[2], "sim": sys.argv[3]}
for name in ("deploy", "sim"):
    path = out / name / "results.json"
    if not path.is_file():
        print(f"{name}: no results.json"); continue
    rounds = [r["wall_time_s"] for r in json.loads(path.read_text())["rounds"]]
    later = rounds[1:] or rounds
    print(f"{name:7s} rounds={len(rounds)} per-round s: {', '.join(f'{t:.1f}' for t in rounds)} | "
          f"round 1 {rounds[0]:.1f} s, later rounds median {statistics.median(later):.1f} s | "
          f"flwr run -> finished {walls[name]} s")
EOF
[ "$deploy_status" = "finished:completed" ] && { [ "$sim_status" = "finished:completed" ] || [ "$sim_status" = skipped ]; }
