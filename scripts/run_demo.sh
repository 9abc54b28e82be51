#!/usr/bin/env bash
# Set up (if needed) and run the default FedSQ simulation with `flwr run .`, offline.
#   bash scripts/run_demo.sh                       # FedSQ, small CNN, 10 Dirichlet(0.3) clients, 20 rounds
#   bash scripts/run_demo.sh "strategy='fedavg'"   # any --run-config overrides
# Starts its own simulation SuperLink on 127.0.0.1 and stops it (by PID) when done.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
.venv/bin/fedsq-prepare

PORT="${FEDSQ_SUPERLINK_PORT:-39191}"
NUM_SUPERNODES="${NUM_SUPERNODES:-10}"
FLWR=.venv/bin/flwr
LOG="$FLWR_HOME/superlink-$PORT.log"
setsid .venv/bin/flower-superlink --insecure --simulation --host 127.0.0.1 --port "$PORT" \
  --disable-runtime-dependency-installation >"$LOG" 2>&1 &
LINK=$!
trap 'kill -TERM -- -"$LINK" 2>/dev/null || true; wait "$LINK" 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -fs "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  kill -0 "$LINK" 2>/dev/null || { echo "SuperLink failed to start, see $LOG"; exit 1; }
  sleep 0.5
done
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedsq-sim"

[superlink.fedsq-sim]
address = "127.0.0.1:$PORT"
insecure = true
TOML

args=(--format json --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=1")
[ $# -gt 0 ] && args+=(--run-config "$*")
started=$(date +%s)
MARK="$FLWR_HOME/run-started"; touch "$MARK"
RUN_ID=$("$FLWR" run . fedsq-sim "${args[@]}" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["run-id"])')
echo "== run $RUN_ID started; streaming its log"
"$FLWR" log "$RUN_ID" fedsq-sim --stream || true
# `flwr run --stream` and `flwr log` exit 0 even when the run failed: ask the SuperLink.
STATUS=$("$FLWR" ls fedsq-sim --run-id "$RUN_ID" --format json |
  .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "== run $RUN_ID: $STATUS in $(( $(date +%s) - started )) s"
[ "$STATUS" = "finished:completed" ]
# The summary of the results.json this run wrote (out-dir is relative to where the SuperLink started: here).
RESULTS=$(find . -name results.json -newer "$MARK" -not -path './.venv/*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
[ -n "$RESULTS" ] || { echo "the run completed but wrote no results.json"; exit 1; }
.venv/bin/python - "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, rounds = r["config"], r["rounds"]
print(f"== {c['strategy']}, {c['model']} on {c['dataset']}, {max(x['expected'] for x in rounds)} nodes: val. accuracy "
      f"round 0 {r['initial']['val_accuracy']:.3f} -> best {r['best_val_accuracy']:.3f} at round "
      f"{r['best_round']} of {len(rounds)}; test {r['test_accuracy']:.3f}")
run_dir = sys.argv[1].removeprefix("./").removesuffix("/results.json")
print(f"== results: {run_dir}/results.json; report: {run_dir}/report.html")
print("== use the model it trained (predict on the run's test split; export S and Q as one ONNX graph):")
print(f"   .venv/bin/fedsq-predict {run_dir} --out {run_dir}/predictions.csv")
print(f"   .venv/bin/fedsq-export {run_dir} --format onnx --out {run_dir}/model.onnx")
PY
