# Sourced by the project's scripts: keep Flower offline-safe and everything it writes inside the checkout.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # else the SuperLink runs `uv sync` per run (fails offline)
export PATH="$PWD/.venv/bin:$PATH"  # the SuperLink spawns flower-superexec from PATH
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-fedsq-$(id -u)}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$PWD/.cache/matplotlib}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$PWD/.cache/uv}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-0}"
mkdir -p "$FLWR_HOME" "$RAY_TMPDIR" "$MPLCONFIGDIR"
