#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, offline. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
