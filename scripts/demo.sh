#!/usr/bin/env bash
# The main job: a short asynchronous GRPO run of a tiny model on a synthetic sorting task, on CPU, in minutes.
# Installs into .venv if needed, builds the model and data offline, SFT warm-up, then async RL. Extra arguments
# go to train_async.py (e.g. --num-rollout 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
OUT=${OUT:-outputs/demo}
.venv/bin/python scripts/prepare_demo.py --out "$OUT"
source scripts/models/tiny-qwen3.sh
.venv/bin/python train_async.py "${MODEL_ARGS[@]}" \
  --hf-checkpoint "$OUT/sft" --prompt-data "$OUT/train.jsonl" --label-key label \
  --eval-prompt-data "$OUT/eval.jsonl" --eval-interval 10 \
  --rollout-batch-size 16 --n-samples-per-prompt 8 --num-rollout 100 --rollout-max-response-len 8 \
  --rollout-temperature 1.0 --lr 5e-4 --async-buffer-size 32 --update-weights-interval 1 --max-staleness 1 \
  --partial-rollout --micro-batch-size 32 \
  --run-dir "${RUN_DIR:-runs/demo}" "$@"
