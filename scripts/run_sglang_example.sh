#!/usr/bin/env bash
# streamrl against real SGLang servers on GPUs (see docs/sglang.md). Needs `pip install sglang` (GPU build) and
# `pip install -e ".[sglang]"` (sglang-router). 8 GPUs: 4 trainer ranks, 2 SGLang engines with TP=2.
#   MODEL=/models/Qwen3-0.6B DATA=/data/train.jsonl EVAL=/data/eval.jsonl bash scripts/run_sglang_example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL to an HF checkpoint directory}
DATA=${DATA:?set DATA to a JSONL prompt file}
EVAL=${EVAL:-$DATA}
exec python train_async.py \
  --hf-checkpoint "$MODEL" --prompt-data "$DATA" --input-key input --label-key label --apply-chat-template \
  --actor-num-nodes 1 --actor-num-gpus-per-node 4 \
  --rollout-engine sglang --rollout-num-gpus 4 --rollout-num-gpus-per-engine 2 \
  --sglang-mem-fraction-static 0.8 --sglang-context-length 8192 --sglang-log-level warning \
  --router-policy cache_aware \
  --rollout-batch-size 32 --n-samples-per-prompt 8 --rollout-max-response-len 2048 --rollout-temperature 1.0 \
  --global-batch-size 256 --async-buffer-size 64 --update-weights-interval 1 --max-staleness 1 --partial-rollout \
  --dynamic-sampling-filter-path check_reward_nonzero_std \
  --eval-prompt-data heldout "$EVAL" --n-samples-per-eval-prompt 4 --eval-interval 20 --eval-temperature 0.6 \
  --num-rollout 200 --lr 1e-6 "$@"
