#!/usr/bin/env bash
# Re-run docs/DEPLOYMENT.md's "One machine, three terminals" walk-through from a READ-ONLY copy of this
# checkout, as a new operator would: everything it writes must go under $WORK.
#
#   bash scripts/readonly-walkthrough.sh            # then read $WORK/walkthrough.log
#
# It exits non-zero unless the run ends finished:completed with both silos aggregated in every round
# (results.json's rounds[].aggregated), and prints WALKTHROUGH OK only then.
#
# The copy is made with `cp -r` and `chmod -R a-w`; since permission bits do not stop root, the commands
# also run in a private mount namespace (`unshare -m`) with the copy bind-mounted read-only, so any write
# into it fails with EROFS whoever runs this. Differences from the page, all for a shared test machine:
# free ports instead of 8000/9094/9095 (SUPERLINK_PORT, ...), `fedsq-prepare --epochs $PREPARE_EPOCHS`
# (default 1; the page's 8 only take longer), PYTHONPATH=<copy> (so a venv that installed another
# checkout in editable mode runs this copy's code), and the terminals' commands run one after another
# in one shell, the long-running ones in the background, stopped by PID at the end.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ro="${RO_COPY:-/tmp/fedsq-ro-checkout}"
export WORK="${WORK:-/tmp/fedsq-ro-work}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export SUPERLINK_PORT="${SUPERLINK_PORT:-$(free_port)}" SILO1_PORT="${SILO1_PORT:-$(free_port)}"
export SILO2_PORT="${SILO2_PORT:-$(free_port)}" PREPARE_EPOCHS="${PREPARE_EPOCHS:-1}" RO="$ro"
chmod -R u+w "$ro" 2>/dev/null || true
rm -rf "$ro" "$WORK"
cp -r "$src" "$ro"
rm -rf "$ro/.flwr-home" "$ro/.cache" "$ro/outputs" "$ro/.pytest_cache"
chmod -R a-w "$ro"
mkdir -p "$WORK"

status=0
unshare -m bash -c 'mount --bind "$RO" "$RO" && mount -o remount,ro,bind "$RO" && exec bash -s' \
  > "$WORK/walkthrough.log" 2>&1 <<'INNER' || status=$?
set -euo pipefail
cd "$RO"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
if touch .write-probe 2>/dev/null; then echo "FAIL: the checkout copy is writable"; exit 1; fi
echo "== checkout $RO is read-only; WORK=$WORK"

# ---- every terminal first
source .venv/bin/activate
export PYTHONPATH=$PWD
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export WORK=${WORK:-/tmp/fedsq-work}
export FEDSQ_CACHE_DIR=$WORK/cache/fedsq MPLCONFIGDIR=$WORK/cache/matplotlib
export FEDSQ_CERTS_DIR=$WORK/certs FEDSQ_KEYS_DIR=$WORK/keys
mkdir -p "$WORK"

# ---- terminal 1, the coordinator
export FLWR_HOME=$WORK/flwr-home/coordinator
mkdir -p "$FLWR_HOME"
deploy/make-certs.sh
python -c "from fedsq_app.tools.pretrain import prepare_main; prepare_main()" --epochs "$PREPARE_EPOCHS"  # = fedsq-prepare
flower-superlink --host 127.0.0.1 --port "$SUPERLINK_PORT" \
  --database "$FLWR_HOME/state.db" \
  --ssl-ca-certfile "$WORK/certs/ca.crt" \
  --ssl-certfile "$WORK/certs/server.pem" \
  --ssl-keyfile "$WORK/certs/server.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation > "$WORK/superlink.log" 2>&1 &
pids+=($!)
for _ in $(seq 60); do grep -q "Uvicorn running on https://127.0.0.1:$SUPERLINK_PORT" "$WORK/superlink.log" && break; sleep 1; done
grep "Uvicorn running" "$WORK/superlink.log"

# ---- terminal 2, the silos: keys
export FLWR_HOME=$WORK/flwr-home/silos
deploy/make-node-keys.sh silo-1 silo-2

# ---- terminal 3, the user: connection and registration
export FLWR_HOME=$WORK/flwr-home/user
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedsq-local"

[superlink.fedsq-local]
address = "127.0.0.1:$SUPERLINK_PORT"
root-certificates = "$WORK/certs/ca.crt"
TOML
deploy/register-node-keys.sh fedsq-local "$WORK/keys/silo-1.pub" "$WORK/keys/silo-2.pub"
flwr supernode list fedsq-local

# ---- terminal 2 again: both silos
export FLWR_HOME=$WORK/flwr-home/silos
flower-supernode --superlink "127.0.0.1:$SUPERLINK_PORT" --root-certificates "$WORK/certs/ca.crt" \
  --auth-supernode-private-key "$WORK/keys/silo-1" --port "$SILO1_PORT" \
  --node-config "partition-id=0 num-partitions=2" > "$WORK/silo-1.log" 2>&1 &
pids+=($!)
flower-supernode --superlink "127.0.0.1:$SUPERLINK_PORT" --root-certificates "$WORK/certs/ca.crt" \
  --auth-supernode-private-key "$WORK/keys/silo-2" --port "$SILO2_PORT" \
  --node-config "partition-id=1 num-partitions=2" > "$WORK/silo-2.log" 2>&1 &
pids+=($!)

# ---- terminal 3: run FedSQ
export FLWR_HOME=$WORK/flwr-home/user
for _ in $(seq 60); do
  [ "$(flwr supernode list fedsq-local --format json | grep -c '"online"')" -ge 2 ] && break; sleep 2
done
flwr supernode list fedsq-local
flwr run . fedsq-local --stream --run-config "num-server-rounds=2 max-train-samples=2000 min-valid-replies=2 out-dir='$WORK/outputs'"
flwr ls fedsq-local
flwr ls fedsq-local --format json > "$WORK/runs.json"
ls "$WORK"/outputs/*/results.json
# The check that can fail: the run finished:completed and every round aggregated the silos' replies (a round
# that kept the start model, e.g. two silos without min-valid-replies=2, is a failure, not a walk-through).
python - <<'PY'
import glob, json, os, sys
work = os.environ["WORK"]
runs = json.loads(open(f"{work}/runs.json").read()[open(f"{work}/runs.json").read().find("{"):])["runs"]
results = json.load(open(glob.glob(f"{work}/outputs/*/results.json")[0]))
rounds = results["rounds"]
print("RESULT", results["validation_source"], [round(r["val_accuracy"], 4) for r in rounds],
      "test", round(results["test_accuracy"], 4), "aggregated", [r["aggregated"] for r in rounds],
      "accepted", [r["accepted"] for r in rounds], "status", [r["status"] for r in runs])
if [r["status"] for r in runs] != ["finished:completed"]:
    sys.exit(f"FAIL: the run did not end finished:completed: {[r['status'] for r in runs]}")
if not rounds or not all(r["aggregated"] and r["accepted"] == 2 for r in rounds):
    sys.exit("FAIL: a round aggregated nothing (it kept the previous model): "
             f"{[(r['round'], r['aggregated'], r['accepted'], r['rejections']) for r in rounds]}")
PY
written=$(find . -newer "$WORK/certs/ca.crt" | head -3 | wc -l)
echo "== nothing was written into the checkout: $written new paths"
[ "$written" -eq 0 ] || { echo "FAIL: the walk-through wrote into the checkout"; exit 1; }
echo "WALKTHROUGH OK"
INNER
grep -E "^(RESULT|FAIL|WALKTHROUGH OK)" "$WORK/walkthrough.log" || tail -20 "$WORK/walkthrough.log"
[ "$status" -eq 0 ] || echo "walk-through FAILED (exit $status): $WORK/walkthrough.log" >&2
exit "$status"
