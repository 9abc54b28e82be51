#!/usr/bin/env bash
# Regenerate requirements.lock: every package the app installs (with the [test] extra), direct and
# transitive, at an exact version. setup.sh, .ci/run and docker/Dockerfile install from it.
#   bash scripts/lock.sh             # re-resolve from pyproject.toml + requirements/pins.in
#   bash scripts/lock.sh --upgrade   # also move to the newest releases the ranges allow
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.cache/lock-tools
[ -x "$TOOLS/bin/pip-compile" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q "pip-tools==7.6.2" >/dev/null 2>&1; }
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$TOOLS/bin/pip-compile" --quiet --extra test --all-build-deps \
  --constraint requirements/pins.in --strip-extras --no-emit-index-url --no-emit-find-links \
  --output-file requirements.lock "$@" pyproject.toml 2> >(grep -v 'is ignored: it is neither' >&2)
echo "requirements.lock: $(grep -c '^[a-z0-9].*==' requirements.lock) pinned packages"
