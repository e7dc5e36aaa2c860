"""Megatron's own flags (`--train-backend megatron`): parallelism, model architecture, checkpoints, hooks.

The architecture flags are what `scripts/models/*.sh` hold, as in slime. Left unset, each is read from the
`--hf-checkpoint` config; set, it must agree with it (checked when the trainer builds the model). Names and
defaults are Megatron's. `--tensor-model-parallel-size` and `--pipeline-model-parallel-size` live with the other
train flags (flags.py); `--load`, `--save`, `--ckpt-step` and `--ref-load` keep their one streamrl meaning for both
backends (the checkpoint directory, its step, the reference model; docs/megatron.md).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from streamrl.config.field import F

# the flags that only the Megatron backend reads: set with --train-backend fsdp they would be silently ignored
_MEGATRON_ONLY = ("context_parallel_size", "sequence_parallel", "no_save_optim", "ckpt_format", "ref_ckpt_step",
                  "opd_teacher_ckpt_step",
                  "custom_megatron_init_path", "custom_megatron_before_train_step_hook_path",
                  "custom_megatron_before_log_prob_hook_path", "attention_dropout", "hidden_dropout",
                  "accumulate_allreduce_grads_in_fp32", "attention_softmax_in_fp32", "attention_backend",
                  "overlap_grad_reduce", "use_distributed_optimizer", "overlap_param_gather", "optimizer_cpu_offload",
                  "use_precision_aware_optimizer")
# Megatron flags of slime's run scripts that this build does not have, and why (an error naming the flag)
_NOT_HERE = {
    "overlap_param_gather": "the distributed optimizer here broadcasts the updated parameters after the step, "
                            "without overlapping it with the next forward",
    "optimizer_cpu_offload": "the optimizer state stays on the GPU (--colocate offloads it between steps)",
    "use_precision_aware_optimizer": "the optimizer keeps fp32 state (Megatron's precision-aware variant needs "
                                     "TransformerEngine)",
}


@dataclass
class MegatronConfig:
    context_parallel_size: int = F(1, "Megatron context parallel size.")
    sequence_parallel: bool = F(False, "Megatron sequence parallelism (with --tensor-model-parallel-size > 1).")
    num_layers: int | None = F(None, "Decoder layers (default: the --hf-checkpoint config's).")
    hidden_size: int | None = F(None, "Hidden size (default: the --hf-checkpoint config's).")
    ffn_hidden_size: int | None = F(None, "MLP hidden size (default: the --hf-checkpoint config's).")
    num_attention_heads: int | None = F(None, "Query heads (default: the --hf-checkpoint config's).")
    group_query_attention: bool = F(False, "Grouped-query attention (with --num-query-groups).")
    num_query_groups: int | None = F(None, "Key/value heads under --group-query-attention.")
    kv_channels: int | None = F(None, "Head dimension (default: the --hf-checkpoint config's).")
    normalization: str = F("LayerNorm", "Norm layers; Qwen3 and Llama use RMSNorm.", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float | None = F(None, "Norm epsilon (default: the --hf-checkpoint config's rms_norm_eps).")
    swiglu: bool = F(False, "SwiGLU MLP (gate and up projections fused in linear_fc1).")
    untie_embeddings_and_output_weights: bool = F(False, "Separate output layer (HF tie_word_embeddings=false).")
    position_embedding_type: str = F("learned_absolute", "Position embeddings; Qwen3 and Llama use rope.",
                                     choices=["learned_absolute", "rope", "none"])
    use_rotary_position_embeddings: bool = F(False, "Megatron's older spelling of --position-embedding-type rope.")
    rotary_base: int | None = F(None, "RoPE base (default: the --hf-checkpoint config's rope_theta).")
    qk_layernorm: bool = F(False, "RMSNorm on each query and key head (Qwen3).")
    vocab_size: int | None = F(None, "Vocabulary size before padding (default: the --hf-checkpoint config's).")
    make_vocab_size_divisible_by: int = F(128, "Pad the vocabulary to a multiple of this x the TP size; the "
                                               "padding rows never reach the engines or the HF export.")
    disable_bias_linear: bool = F(False, "No biases in the linear layers (Qwen3, Llama).")
    no_save_optim: bool = F(False, "Megatron checkpoints without the optimizer state (a resume then restarts the "
                                   "optimizer).")
    ref_ckpt_step: int | None = F(None, "With a Megatron checkpoint as --ref-load: its iteration to read (default: "
                                        "latest_checkpointed_iteration.txt's).")
    opd_teacher_ckpt_step: int | None = F(None, "The same for a Megatron checkpoint as --opd-teacher-load.")
    ckpt_format: str = F("torch_dist", "Megatron checkpoint format of --save: torch_dist (Megatron's and slime's "
                                       "default, dist_checkpointing; TP-size independent) or torch (one file per TP "
                                       "rank). --load and --ref-load read either.", choices=["torch_dist", "torch"])
    # slime's run scripts pass these; here each is what the trainer does anyway, or refused with the reason
    attention_dropout: float = F(0.0, "Attention dropout; 0 only (RL log-probs must not depend on a dropout mask; "
                                      "slime's scripts set 0.0, Megatron's default is 0.1).")
    hidden_dropout: float = F(0.0, "Hidden dropout; 0 only, as --attention-dropout.")
    accumulate_allreduce_grads_in_fp32: bool = F(False, "Accepted: gradients are fp32 here already (fp32 parameters "
                                                        "under bf16 autocast).")
    attention_softmax_in_fp32: bool = F(False, "Accepted: SDPA and FlashAttention accumulate the softmax in fp32.")
    attention_backend: str = F("auto", "Accepted: the core attention is torch SDPA (FlashAttention's varlen kernel "
                                       "for packed streams on a GPU) whichever is named.",
                               choices=["auto", "flash", "fused", "unfused", "local"])
    overlap_grad_reduce: bool = F(False, "Accepted: torch DDP all-reduces gradient buckets during backward.")
    use_distributed_optimizer: bool = F(False, "Shard the optimizer state over the data-parallel ranks (ZeRO-1: "
                                               "torch's ZeroRedundancyOptimizer, not Megatron's CUDA-only class); "
                                               "torch_dist checkpoints only.")
    overlap_param_gather: bool = F(False, "Not in this build (an error says why).")
    optimizer_cpu_offload: bool = F(False, "Not in this build (an error says why).")
    use_precision_aware_optimizer: bool = F(False, "Not in this build (an error says why).")
    custom_megatron_init_path: str | None = F(None, "slime's hook `fn(args)`, called on every rank once the "
                                                    "Megatron model is built.")
    custom_megatron_before_train_step_hook_path: str | None = F(
        None, "slime's hook `fn(args, rollout_id, step_id, model, optimizer, opt_param_scheduler)`, called before "
              "each optimizer step's forward/backward (model: the list of model chunks; no scheduler here: None).")
    custom_megatron_before_log_prob_hook_path: str | None = F(
        None, "slime's hook `fn(args, model, store_prefix)`, called before the no-grad log-prob forwards of a step "
              "(store_prefix '' for the policy).")


def validate_megatron(args: argparse.Namespace, error: type[Exception]) -> None:
    """Cross-field rules of the Megatron flags; `error` is the parser's ConfigError."""
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.train_backend != "megatron":
        defaults = {f.name: f.default for f in dataclasses.fields(MegatronConfig)}
        for name in _MEGATRON_ONLY:
            if getattr(args, name) != defaults[name]:
                raise error(f"--{name.replace('_', '-')} is read by the Megatron trainer only: add "
                            "--train-backend megatron or drop it.")
        return
    for name, why in _NOT_HERE.items():
        if getattr(args, name):
            raise error(f"--{name.replace('_', '-')}: not in this build: {why}. Drop it.")
    for name in ("attention_dropout", "hidden_dropout"):
        if getattr(args, name):
            raise error(f"--{name.replace('_', '-')} {getattr(args, name)}: dropout is not supported (the trainer's "
                        "log-probs must match the engine's); use 0.0, as slime's scripts do.")
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    for flag, size in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                       ("--context-parallel-size", cp)):
        if size < 1:
            raise error(f"{flag} must be >= 1, got {size}.")
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    if world % (tp * pp * cp):
        raise error(f"--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size "
                    f"({tp * pp * cp}) must divide the trainer ranks (--actor-num-gpus-per-node x "
                    f"--actor-num-nodes = {world}).")
    if cp > 1 and args.attn_implementation == "varlen":  # context.py: padded rows (a thd micro-batch runs padded)
        raise error(f"--context-parallel-size {cp} with --attn-implementation varlen: not in this build, drop one.")
    if args.use_distributed_optimizer and args.ckpt_format == "torch":  # each rank holds part of the state
        raise error("--use-distributed-optimizer with --ckpt-format torch: use --ckpt-format torch_dist (it writes "
                    "each data-parallel rank's share of the optimizer state).")
    if pp > 1 and args.ckpt_format == "torch":  # one file per TP rank; the stages' layers would collide
        raise error(f"--ckpt-format torch with --pipeline-model-parallel-size {pp}: use --ckpt-format torch_dist.")
    if args.group_query_attention != (args.num_query_groups is not None):
        raise error("--group-query-attention and --num-query-groups go together (Megatron ignores the groups "
                    "without it): give both or neither.")
    heads, groups = args.num_attention_heads, args.num_query_groups
    if heads is not None and groups is not None and heads % groups:
        raise error(f"--num-attention-heads ({heads}) must be a multiple of --num-query-groups ({groups}).")
    for flag, value in (("--num-attention-heads", heads), ("--num-query-groups", groups),
                        ("--ffn-hidden-size", args.ffn_hidden_size)):
        if value is not None and value % tp:
            raise error(f"{flag} ({value}) must be a multiple of --tensor-model-parallel-size ({tp}).")
    if args.num_layers is not None:  # a model flag file: it must describe a Qwen3/Llama-family model
        for flag, ok in (("--swiglu", args.swiglu), ("--normalization RMSNorm", args.normalization == "RMSNorm"),
                         ("--disable-bias-linear", args.disable_bias_linear),
                         ("--position-embedding-type rope", args.position_embedding_type == "rope")):
            if not ok:
                raise error(f"--train-backend megatron converts Qwen3/Llama-family models: add {flag} to the "
                            "model flags.")
    if args.make_vocab_size_divisible_by < 1:
        raise error("--make-vocab-size-divisible-by must be >= 1.")
    if args.log_probs_chunk_size > 0 and tp > 1:
        raise error("--log-probs-chunk-size with --train-backend megatron needs --tensor-model-parallel-size 1 "
                    "(the output layer is vocabulary-sharded under TP): drop one of them.")
    for flag, off in (("--true-on-policy-mode", args.true_on_policy_mode),
                      ("--use-liger-kernel", args.use_liger_kernel)):
        if off:
            raise error(f"{flag} needs --train-backend fsdp in this build (the Megatron backend lacks it).")
