#!/usr/bin/env bash
# Create .venv and install fedsq from requirements.lock (exact versions of everything; see scripts/lock.sh).
# Idempotent: when .venv already matches the lock, nothing is installed.
#   TORCH_SPEC swaps the PyTorch build after the lock is installed. Default: none (the lock's
#   torch==2.14.1/torchvision==0.29.1, a CUDA build that also runs on CPU). CPU-only box elsewhere:
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOG=.cache/setup.log
mkdir -p .cache
: >"$LOG"
started=$SECONDS

# One short line per step; pip's own output goes to $LOG and is shown only when the step fails.
step() {
  local name=$1; shift
  printf '== %-48s' "$name" >&2
  local t0=$SECONDS
  if "$@" >>"$LOG" 2>&1; then
    printf ' done (%d s)\n' $((SECONDS - t0)) >&2
  else
    printf ' FAILED\n' >&2
    echo "setup.sh: step '$name' failed; its output (from $LOG):" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

lock_matches() { .venv/bin/python -m fedsq_app.lockcheck requirements.lock >>"$LOG" 2>&1; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv ($($PYTHON --version 2>&1))" "$PYTHON" -m venv .venv
fi
if ! lock_matches; then
  step "installing requirements.lock (~3 min, torch ~5 GB)" \
    .venv/bin/pip install --disable-pip-version-check -r requirements.lock
  if [ -n "${TORCH_SPEC:-}" ]; then
    # shellcheck disable=SC2086
    step "installing TORCH_SPEC ($TORCH_SPEC)" .venv/bin/pip install --disable-pip-version-check $TORCH_SPEC
  fi
fi
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('fedsq')" 2>/dev/null; then
  step "installing fedsq (editable, no dependencies)" \
    .venv/bin/pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
step "checking .venv against requirements.lock" lock_matches
.venv/bin/python -c "import flwr, torch, torchvision; print(f'== ready: flwr {flwr.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}')" >&2
echo "== setup took $((SECONDS - started)) s (log: $LOG)" >&2
