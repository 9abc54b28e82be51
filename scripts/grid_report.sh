#!/bin/bash
# Rebuild a grid's report from its finished cells and copy it into docs/results/<name>/ (cells.csv, summary.*,
# paired.csv, robustness*.csv, power.csv, PNGs). Extra arguments go to fedsq-bench (e.g. --defences defaults,
# which summary.md then names).
#   bash scripts/grid_report.sh PRESET OUT DEST [fedsq-bench flags...]
#   bash scripts/grid_report.sh fmnist-cross-robust outputs/bench/fmnist-cross-robust docs/results/cross-domain-robust
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
[ $# -ge 3 ] || { sed -n 2,6p "$0"; exit 2; }
PRESET="$1" OUT="$2" DEST="$3"
shift 3
PYTHONPATH=$PWD nice -n 19 .venv/bin/python -m fedsq_app.tools.bench.cli --preset "$PRESET" --out "$OUT" --report-only "$@"
mkdir -p "$DEST"
for file in cells.csv summary.csv summary.md paired.csv robustness.csv robustness_tests.csv power.csv server_lr_tuning.csv; do
    if [ -f "$OUT/$file" ]; then cp "$OUT/$file" "$DEST"/; fi
done
cp "$OUT"/*.png "$DEST"/
ls "$DEST"
