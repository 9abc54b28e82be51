#!/usr/bin/env bash
# Create .venv and install fedsq from requirements.lock (exact versions of everything; see scripts/lock.sh).
# Idempotent: when .venv already matches the lock, nothing is installed.
#   TORCH_SPEC swaps the PyTorch build after the lock is installed. Default: none (the lock's
#   torch==2.14.1/torchvision==0.29.1, a CUDA build that also runs on CPU). CPU-only box elsewhere:
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
#   --tests also makes sure the Debian packages of requirements/system-tests.txt are there (apt-get as root).
set -euo pipefail
TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (only --tests)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOG=.cache/setup.log
mkdir -p .cache
: >"$LOG"
started=$SECONDS

# One short line per step; the tools' own output goes to $LOG and is shown only when the step fails.
# try_step reports a failure and returns 1; step ends the setup there.
try_step() {
  local name=$1; shift
  printf '== %-48s' "$name" >&2
  local t0=$SECONDS
  if "$@" >>"$LOG" 2>&1; then
    printf ' done (%d s)\n' $((SECONDS - t0)) >&2
  else
    printf ' FAILED\n' >&2
    echo "setup.sh: step '$name' failed; its output (from $LOG):" >&2
    tail -n 30 "$LOG" >&2
    return 1
  fi
}
step() { try_step "$@" || exit 1; }

# The Debian packages of requirements/system-tests.txt whose command is not on PATH (sbin included).
missing_system_packages() {
  sed 's/#.*//' requirements/system-tests.txt | while read -r command package; do
    [ -n "$command" ] || continue
    PATH="$PATH:/usr/sbin:/sbin" command -v "$command" >/dev/null 2>&1 || echo "$package"
  done | sort -u | xargs
}
apt_install() {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
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
# Reinstalled whenever pyproject.toml changes: its [project.scripts] entry points live in .venv/bin.
stamp=.venv/.fedsq-pyproject.sha256
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('fedsq')" 2>/dev/null ||
   ! sha256sum -c --status "$stamp" 2>/dev/null; then
  step "installing fedsq (editable, no dependencies)" \
    .venv/bin/pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
  sha256sum pyproject.toml > "$stamp"
fi
step "checking .venv against requirements.lock" lock_matches
if [ "$TESTS" = 1 ]; then
  missing="$(missing_system_packages)"
  if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    try_step "installing system packages: $missing (apt-get)" apt_install $missing || true
    missing="$(missing_system_packages)"
  fi
  if [ -n "$missing" ]; then
    echo "== missing system packages: $missing; install them with: sudo apt-get install -y $missing" >&2
    if [ "${CI:-}" = true ]; then
      echo "setup.sh: CI=true, so the tests that need them would fail; stopping here" >&2
      exit 1
    fi
    echo "== the tests that need them will skip, naming this command" >&2
  else
    echo "== system packages for the tests: present ($(sed 's/#.*//' requirements/system-tests.txt | awk 'NF {print $2}' | sort -u | xargs))" >&2
  fi
fi
.venv/bin/python -c "import flwr, torch, torchvision; print(f'== ready: flwr {flwr.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}')" >&2
echo "== setup took $((SECONDS - started)) s (log: $LOG)" >&2
