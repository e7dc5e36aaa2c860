# Megatron architecture flags of Qwen3-0.6B, as in slime's scripts/models/qwen3-0.6B.sh (streamrl/models/tiny.py's
# random-init "qwen3-0.6b" preset has the same shape but transformers' default rope_theta, 10000):
#   source scripts/models/qwen3-0.6B.sh
#   python3 train_async.py --train-backend megatron "${MODEL_ARGS[@]}" --hf-checkpoint Qwen3-0.6B ...
# Tied embeddings (no --untie-embeddings-and-output-weights), as the HF config's tie_word_embeddings.
MODEL_ARGS=(
   --swiglu
   --num-layers 28
   --hidden-size 1024
   --ffn-hidden-size 3072
   --num-attention-heads 16
   --group-query-attention
   --num-query-groups 8
   --use-rotary-position-embeddings
   --disable-bias-linear
   --normalization RMSNorm
   --norm-epsilon 1e-6
   --rotary-base 1000000
   --vocab-size 151936
   --kv-channels 128
   --qk-layernorm
)
