#!/bin/bash
# The GPU cell: ResNet-18 at 32 px, S pretrained by fedsq-pretrain on a Fashion-MNIST slice, 20 silos,
# Dirichlet α=0.1, FedSQ vs FedAvg vs FedAdam, 2 seeds (SEEDS="0 1 2" for more), bf16; then images/s next to the
# card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). Preset: fedsq_app/tools/bench/conf/gpu-cell.toml.
#
#   bash scripts/gpu_cell.sh prepare   # HERE (a machine with the Debian package and PyPI): the data into gpu-data/
#                                      # (untracked, not ignored: it travels with the working tree, ~30 MB), and the
#                                      # Python packages the device image lacks as wheels into .whl/ (git-excluded)
#   bash scripts/gpu_cell.sh run       # ON THE DEVICE (the `device` tool's run, carry [".whl"], timeout_s 600):
#                                      # everything lands in $OUT (or outputs/gpu-cell without it)
#
# Expected runtime on one H100 (estimated, not measured: no GPU was lent so far): pretraining 6,000 images × 4
# epochs and the calibration < 1 min; a run is ≤ 20 rounds × 6,000 training images (3.3 GFLOP per image for
# FedAvg/FedAdam, 4.4 for FedSQ: ResNet-18 at 32 px is 1.11 GFLOP forward) plus 1,500 validation images per
# round; batch 32 is launch-bound, so assume ~3,000-6,000 images/s and ~1 s per round of 20 clients' set-up:
# ≈ 2-4 s per round, 1-1.5 min per run with start-up and test; 6 runs ≈ 6-10 min. The cell stops itself
# 540 s after it starts (the report then covers the runs that finished; rerunning resumes the rest).
# Checked on CPU only (the whole pipeline, 5 clients, 2 rounds, --set device=cpu: the command below).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
DEBIAN_FMNIST=/usr/share/datasets/fashion-mnist
# What the device image lacks: requirements/gpu-cell-extra.txt (pinned as in the lock).
WHEELS="$(grep -v '^#' requirements/gpu-cell-extra.txt)"

if [ "$MODE" = prepare ]; then
    mkdir -p gpu-data/fashion-mnist
    [ -d "$DEBIAN_FMNIST" ] || { echo "apt-get install -y dataset-fashion-mnist first"; exit 1; }
    cp "$DEBIAN_FMNIST"/*.gz gpu-data/fashion-mnist/
    EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
    for spec in $WHEELS; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$spec"
    done
    du -sh gpu-data .whl
    echo "now: device run, command 'bash scripts/gpu_cell.sh run', carry ['.whl'], timeout_s 600"
    exit 0
fi

OUT="${OUT:-outputs/gpu-cell}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_cell.log") 2>&1
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export FEDSQ_CACHE_DIR=$PWD/.cache/fedsq MPLCONFIGDIR=/tmp/mpl
PY=python3
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
[ -x .venv/bin/python ] && PY=.venv/bin/python  # a machine with the project's own venv
DATA=gpu-data/fashion-mnist
[ -f $DATA/train-images-idx3-ubyte.gz ] || DATA=$DEBIAN_FMNIST
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
$PY -c "import torch, flwr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); print('flwr', flwr.__version__)"
START=$(date +%s)
CKPT=${CKPT:-gpu-data/resnet18-fmnist-train0-6000.safetensors}
EXTRA=${EXTRA:-}  # more fedsq-bench flags; a CPU smoke test of the pipeline (no GPU):
# OUT=/tmp/gpu-smoke CKPT=/tmp/gpu-smoke/r18.safetensors PRETRAIN_SPLIT="train[:200]" PRETRAIN_EPOCHS=1 PROXY_SAMPLES=100 \
#   SEEDS=0 EXTRA="--set device=cpu --set amp=off --rounds 1 --max-train-samples 300 --strategies fedsq fedadam --threads 1" \
#   bash scripts/gpu_cell.sh run
if [ ! -f "$CKPT" ]; then
    $PY -m fedsq_app.tools.pretrain --model resnet18 --dataset "idx:$DATA" --split "${PRETRAIN_SPLIT:-train[:6000]}" \
        --epochs "${PRETRAIN_EPOCHS:-4}" \
        --lr 0.02 --batch-size 64 --out "$CKPT" --calibrate --proxy-split "train[6000:9000]" \
        --proxy-max-samples "${PROXY_SAMPLES:-2000}" --lrs 0.01,0.03,0.1 --calibrate-epochs 1 --run-config-out "$OUT/calibrated.toml"
fi
LR=$(grep '^lr' "$OUT/calibrated.toml" | cut -d= -f2 | tr -d ' ' || echo 0.05)
echo "pretrain + calibration: $(( $(date +%s) - START )) s; calibrated lr=$LR"
# With a GPU: compiled (torch.compile, inductor, fullgraph) against eager training steps, fp32, batch 32, for the
# plain step and FedSQ's with the mask cache (the preset's); capped at COMPILE_S seconds (0 skips it), which come
# out of the bench's 540 s.
if [ "${COMPILE_S:-150}" -gt 0 ] && $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    timeout "${COMPILE_S:-150}" $PY -m fedsq_app.tools.perf.cli steps --compile --device cuda --models resnet18-32 \
        --variants plain cache --rounds 30 | tee "$OUT/compile.md" || true
fi
LEFT=$(( 540 - ($(date +%s) - START) ))
timeout "$LEFT" $PY -m fedsq_app.tools.bench.cli --preset gpu-cell --out "$OUT/bench" \
    --seeds ${SEEDS:-0 1} --set "dataset=idx:$DATA" --set "pretrained=$CKPT" --set "lr=$LR" $EXTRA || true
$PY -m fedsq_app.tools.bench.cli --preset gpu-cell --out "$OUT/bench" --seeds ${SEEDS:-0 1} \
    --set "dataset=idx:$DATA" --set "pretrained=$CKPT" --set "lr=$LR" $EXTRA --report-only || true
$PY -m fedsq_app.tools.bench.throughput --out "$OUT/bench" --peak-tflops 989 | tee "$OUT/throughput.md"
cp "$OUT/bench/summary.md" "$OUT/bench/cells.csv" "$OUT/" 2>/dev/null || true
echo "gpu cell: $(( $(date +%s) - START )) s"
