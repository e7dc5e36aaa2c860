# Model/cluster flags for the tiny random-init Qwen3 (streamrl/models/tiny.py, preset "tiny") on a 2-core CPU:
# one embedded engine and one FSDP rank, one torch thread each, so generation and training overlap.
MODEL_ARGS=(
  --rollout-num-engines 1 --engine-torch-threads 1
  --actor-num-nodes 1 --actor-num-gpus-per-node 1 --train-torch-threads 1
)
