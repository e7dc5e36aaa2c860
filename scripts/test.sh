#!/usr/bin/env bash
# The test command (README, .ci/run): installs into .venv if needed, then runs the default suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
