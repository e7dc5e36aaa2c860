#!/usr/bin/env bash
# Create or reuse .venv and install streamrl with pinned dependencies. torch goes first, pinned to the CPU build
# that `pip install torch==2.13.0` finds on these machines, so nothing can pull a CUDA build or nvidia-* wheels.
# Says what it is doing (the first install takes minutes); silent when everything is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.streamrl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  t0=$SECONDS
  say "installing torch 2.13.0 (CPU build, ~200 MB; the first time takes a few minutes) ..."
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  say "installing streamrl and its pinned dependencies (transformers, ray, wandb, sglang-router, pytest, ...) ..."
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  if .venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup: nvidia-* wheels found in .venv; refusing (CPU build expected)" >&2; exit 1
  fi
  touch "$stamp"
  say "done in $((SECONDS - t0)) s ($(.venv/bin/pip list 2>/dev/null | wc -l) packages in .venv)"
fi
