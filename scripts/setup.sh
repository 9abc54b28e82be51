#!/usr/bin/env bash
# Create .venv and install fedsq with its dependencies (idempotent: a second run installs nothing new).
#   TORCH_SPEC picks the PyTorch build. Default: the CUDA build that works on this kind of machine and on
#   GPUs. CPU-only box elsewhere: TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import fedsq_app, torch, torchvision, flwr, flwr_datasets, pytest" 2>/dev/null; then
  echo "== installing dependencies into .venv (first time: a few minutes)"
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet $TORCH_SPEC
  .venv/bin/pip install --quiet -e ".[test]"
fi
.venv/bin/python -c "import flwr, torch, torchvision; print(f'flwr {flwr.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}')"
