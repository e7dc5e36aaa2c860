# Model/cluster flags for a Qwen3-0.6B-shaped model on ONE GPU, trainer and embedded engine sharing the card
# (the setup of scripts/bench/async_vs_sync_gpu.py, docs/benchmarks.md: async 1.85-2.0x sync on an H100):
#   source scripts/models/qwen3-0.6b-one-gpu.sh
#   python3 train_async.py "${MODEL_ARGS[@]}" --hf-checkpoint ... --prompt-data ... --partial-rollout \
#       --pause-generation-mode in_place ...
# - bf16 mixed precision in the trainer, bf16 engine; MPS so that the two processes' kernels overlap;
# - arrivals join the engine's running batch every 8 decode steps (one prefill for several groups);
# - micro-batches packed by tokens (long-tailed response lengths waste little on padding).
MODEL_ARGS=(
  --rollout-num-engines 1 --actor-num-nodes 1 --actor-num-gpus-per-node 1
  --bf16 --use-mps
  --sglang-num-continuous-decode-steps 8 --sglang-server-concurrency 256
  --use-dynamic-batch-size --max-tokens-per-gpu 6144
)
