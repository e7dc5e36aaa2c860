"""Megatron's flags: their names exist, the model flag files parse and validate, bad combinations name the flag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from streamrl.config import ConfigError, build_parser, default_args, parse_args

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_FLAGS = [
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size", "--sequence-parallel",
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--group-query-attention",
    "--num-query-groups", "--kv-channels", "--normalization", "--norm-epsilon", "--swiglu",
    "--untie-embeddings-and-output-weights", "--rotary-base", "--qk-layernorm", "--vocab-size",
    "--make-vocab-size-divisible-by", "--disable-bias-linear", "--position-embedding-type",
    "--use-rotary-position-embeddings", "--load", "--save", "--ref-load", "--ckpt-step", "--no-save-optim",
    "--custom-megatron-init-path", "--custom-megatron-before-train-step-hook-path",
    "--custom-megatron-before-log-prob-hook-path",
]


def test_megatron_flag_names_exist():
    options = {s for a in build_parser()._actions for s in a.option_strings}
    assert [f for f in MEGATRON_FLAGS if f not in options] == []


@pytest.mark.parametrize("script", ["tiny.sh", "qwen3-0.6B.sh"])
def test_model_flag_files_validate(script):
    out = subprocess.run(["bash", "-c", f"source {ROOT / 'scripts/models' / script}; printf '%s\\n' "
                          '"${MODEL_ARGS[@]}"'], capture_output=True, text=True, check=True).stdout
    args = parse_args(["--train-backend", "megatron", *out.split("\n")[:-1]])
    assert args.position_embedding_type == "rope" and args.swiglu and args.qk_layernorm
    assert args.num_query_groups in (2, 8)


@pytest.mark.parametrize("overrides, flag", [
    ({"num_layers": 2}, "--swiglu"),
    ({"group_query_attention": True}, "--num-query-groups"),
    ({"num_attention_heads": 6, "num_query_groups": 4, "group_query_attention": True}, "--num-query-groups"),
    ({"tensor_model_parallel_size": 2}, "--tensor-model-parallel-size"),  # 2 does not divide the 1 trainer rank
    ({"pipeline_model_parallel_size": 2}, "--pipeline-model-parallel-size"),
    ({"pipeline_model_parallel_size": 2, "actor_num_gpus_per_node": 2, "ckpt_format": "torch"}, "--ckpt-format"),
    ({"context_parallel_size": 2}, "--context-parallel-size"),
    ({"context_parallel_size": 2, "actor_num_gpus_per_node": 2, "attn_implementation": "varlen"},
     "--attn-implementation varlen"),
    ({"log_probs_chunk_size": 64, "tensor_model_parallel_size": 2, "actor_num_gpus_per_node": 2},
     "--log-probs-chunk-size"),
])
def test_bad_megatron_combinations_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        default_args(train_backend="megatron", **overrides)


def test_megatron_only_flags_need_the_megatron_backend():
    with pytest.raises(ConfigError, match="--custom-megatron-init-path"):
        default_args(custom_megatron_init_path="x.py:f")
    with pytest.raises(ConfigError, match="--no-save-optim"):
        default_args(no_save_optim=True)
    default_args(num_layers=3)  # architecture flags of a sourced model file are harmless under fsdp


def test_flags_that_disagree_with_the_checkpoint_are_named_before_ray(tiny_ckpt):
    from streamrl.config.preflight import preflight

    with pytest.raises(ConfigError, match="--hidden-size 256 disagrees"):
        preflight(default_args(train_backend="megatron", hf_checkpoint=tiny_ckpt, hidden_size=256))
    model = ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--position-embedding-type", "rope"]
    args = parse_args(["--train-backend", "megatron", "--hf-checkpoint", tiny_ckpt, "--num-layers", "3", *model])
    with pytest.raises(ConfigError, match="--qk-layernorm is missing"):
        preflight(args)
    with pytest.raises(ConfigError, match="--custom-megatron-init-path"):
        preflight(default_args(train_backend="megatron", hf_checkpoint=tiny_ckpt,
                               custom_megatron_init_path="no_such_module:init"))
    out = subprocess.run(["bash", "-c", f"source {ROOT / 'scripts/models/tiny.sh'}; printf '%s\\n' "
                          '"${MODEL_ARGS[@]}"'], capture_output=True, text=True, check=True).stdout
    preflight(parse_args(["--train-backend", "megatron", "--hf-checkpoint", tiny_ckpt, *out.split("\n")[:-1]]))


def test_ref_load_may_be_a_megatron_checkpoint_under_megatron_only(tiny_ckpt, tmp_path):
    from streamrl.config.preflight import preflight

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    kw = dict(hf_checkpoint=tiny_ckpt, use_kl_loss=True, kl_loss_coef=0.1, ref_load=str(tmp_path))
    preflight(default_args(train_backend="megatron", **kw))  # the Megatron rank reads it (torch_dist or torch)
    with pytest.raises(ConfigError, match="--ref-load .*not an HF checkpoint directory"):
        preflight(default_args(train_backend="fsdp", **kw))
    assert default_args(train_backend="megatron", hf_checkpoint=tiny_ckpt).ckpt_format == "torch_dist"  # Megatron's
    with pytest.raises(ConfigError, match="--ckpt-format"):
        default_args(ckpt_format="torch")  # read by the Megatron trainer only


def test_slime_script_flags_are_accepted_or_refused_with_the_reason():
    """The Megatron flags of slime's run scripts: those that the trainer does anyway parse; the others name
    themselves and say why."""
    args = default_args(train_backend="megatron", accumulate_allreduce_grads_in_fp32=True,
                        attention_softmax_in_fp32=True, attention_backend="flash", overlap_grad_reduce=True,
                        attention_dropout=0.0, hidden_dropout=0.0)
    assert args.attention_backend == "flash"
    assert default_args(train_backend="megatron", use_distributed_optimizer=True).use_distributed_optimizer
    # context parallel with slime's default packed format: accepted (its micro-batches run padded)
    assert default_args(train_backend="megatron", context_parallel_size=2, actor_num_gpus_per_node=2,
                        qkv_format="thd").qkv_format == "thd"
    with pytest.raises(ConfigError, match="--use-distributed-optimizer with --ckpt-format torch"):
        default_args(train_backend="megatron", use_distributed_optimizer=True, ckpt_format="torch")
    with pytest.raises(ConfigError, match="--use-distributed-optimizer is read by the Megatron trainer only"):
        default_args(use_distributed_optimizer=True)
    for flag, why in (("overlap_param_gather", "parameter"),
                      ("optimizer_cpu_offload", "--colocate"), ("use_precision_aware_optimizer", "fp32")):
        with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')}: not in this build: .*{why}"):
            default_args(train_backend="megatron", **{flag: True})
    with pytest.raises(ConfigError, match="--attention-dropout 0.1: dropout"):
        default_args(train_backend="megatron", attention_dropout=0.1)
    with pytest.raises(ConfigError, match="--overlap-grad-reduce is read by the Megatron trainer only"):
        default_args(overlap_grad_reduce=True)
