#!/usr/bin/env bash
# Create or reuse .venv and install streamrl with pinned dependencies. torch goes first, pinned to the CPU build
# that `pip install torch==2.13.0` finds on these machines, so nothing can pull a CUDA build or nvidia-* wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.streamrl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  if .venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup: nvidia-* wheels found in .venv; refusing (CPU build expected)" >&2; exit 1
  fi
  touch "$stamp"
fi
