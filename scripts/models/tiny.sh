# Megatron architecture flags of the tiny demo Qwen3 (streamrl/models/tiny.py, preset "tiny", the in-repo
# character tokenizer's 88 symbols), as slime's scripts/models/*.sh hold them:
#   source scripts/models/tiny.sh
#   python3 train_async.py --train-backend megatron "${MODEL_ARGS[@]}" --hf-checkpoint outputs/demo/sft ...
# Every flag here must agree with the --hf-checkpoint config (the trainer checks it and names the flag).
# (scripts/models/tiny-qwen3.sh holds the demo's cluster flags, also as MODEL_ARGS: copy them first.)
MODEL_ARGS=(
   --swiglu
   --num-layers 3
   --hidden-size 128
   --ffn-hidden-size 384
   --num-attention-heads 4
   --group-query-attention
   --num-query-groups 2
   --kv-channels 32
   --position-embedding-type rope
   --disable-bias-linear
   --normalization RMSNorm
   --norm-epsilon 1e-6
   --rotary-base 10000
   --vocab-size 88
   --qk-layernorm
)
