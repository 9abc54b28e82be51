#!/bin/bash
# Rebuild the cross-domain robustness grid's report from its finished cells and copy it into
# docs/results/cross-domain-robust/ (cells.csv, summary.*, paired.csv, robustness*.csv, power.csv, PNGs).
#   bash scripts/robust_report.sh [outputs/bench/fmnist-cross-robust]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT="${1:-outputs/bench/fmnist-cross-robust}"
DEST=docs/results/cross-domain-robust
PYTHONPATH=$PWD nice -n 19 .venv/bin/python -m fedsq_app.tools.bench.cli --preset fmnist-cross-robust --out "$OUT" --report-only
mkdir -p "$DEST"
cp "$OUT"/{cells.csv,summary.csv,summary.md,paired.csv,robustness.csv,robustness_tests.csv,power.csv} "$DEST"/
cp "$OUT"/*.png "$DEST"/
ls "$DEST"
