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
# into it fails with EROFS whoever runs this. The commands are the page's, read from docs/DEPLOYMENT.md
# (`python3 tests/docblocks.py` prints them). Differences from the page, all for a shared test machine:
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

# ---- the page's walk-through, read from docs/DEPLOYMENT.md (tests/docblocks.py: its marked blocks in order,
# free ports for 8000/9094/9095, long-running processes in the background with their PIDs in pids)
mkdir -p "$WORK"
python3 tests/docblocks.py > "$WORK/walkthrough-commands.sh"
echo "== running docs/DEPLOYMENT.md's walk-through ($WORK/walkthrough-commands.sh)"
source "$WORK/walkthrough-commands.sh"
flwr ls fedsq-local --format json > "$WORK/runs.json"
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
