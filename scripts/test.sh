#!/usr/bin/env bash
# Set up (if needed: .venv from the lock, the Debian packages the tests need) and run the whole test suite,
# offline, with the slowest tests listed at the end. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh --tests
.venv/bin/python -m pytest -q --durations=15 "$@"
