"""Flags: slime's names, frozen list, cross-field errors that name the flag to change, instant --help."""

import subprocess
import sys

import pytest

from streamrl.config import ConfigError, build_parser, default_args

SLIME_FLAGS = [
    "--num-rollout", "--rollout-batch-size", "--n-samples-per-prompt", "--rollout-max-response-len",
    "--rollout-temperature", "--async-buffer-size", "--update-weights-interval", "--advantage-estimator",
    "--prompt-data", "--input-key", "--label-key", "--metadata-key", "--apply-chat-template", "--rollout-shuffle",
    "--rollout-seed", "--rollout-max-prompt-len", "--hf-checkpoint", "--global-batch-size", "--micro-batch-size",
    "--num-steps-per-rollout", "--lr", "--eps-clip", "--eps-clip-high", "--use-kl-loss", "--kl-loss-coef",
    "--use-tis", "--tis-clip", "--tis-clip-low", "--partial-rollout", "--mask-offpolicy-in-partial-rollout",
    "--buffer-filter-path", "--custom-rm-path", "--actor-num-nodes", "--actor-num-gpus-per-node",
    "--rollout-num-gpus", "--rollout-num-gpus-per-engine", "--colocate", "--tensor-model-parallel-size",
    "--loss-type", "--use-wandb", "--check-weight-update-equal",
]


def test_slime_flag_names_exist():
    options = {s for a in build_parser()._actions for s in a.option_strings}
    missing = [f for f in SLIME_FLAGS if f not in options]
    assert not missing


def test_derived_values():
    a = default_args(rollout_batch_size=4, n_samples_per_prompt=4, num_steps_per_rollout=2, eps_clip=0.3)
    assert a.global_batch_size == 8 and a.eps_clip_high == 0.3 and a.rollout_num_engines == 1
    a = default_args(rollout_num_gpus=8, rollout_num_gpus_per_engine=2)
    assert a.rollout_num_engines == 4


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"colocate": True}, "--colocate"),
        ({"rollout_temperature": 0.0}, "--rollout-temperature"),
        ({"rollout_num_gpus": 3, "rollout_num_gpus_per_engine": 2}, "--rollout-num-gpus"),
        ({"global_batch_size": 12, "n_samples_per_prompt": 8}, "--n-samples-per-prompt"),
        ({"async_buffer_size": 2, "rollout_batch_size": 8}, "--async-buffer-size"),
        ({"mask_offpolicy_in_partial_rollout": True}, "--partial-rollout"),
        ({"use_kl_loss": True}, "--kl-loss-coef"),
        ({"actor_num_gpus_per_node": 3}, "--global-batch-size"),
    ],
)
def test_bad_combinations_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        default_args(**overrides)


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, runpy; sys.argv=['train_async.py','--help']\n"
        "try:\n    runpy.run_path('train_async.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('torch','ray','transformers','sglang','megatron') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--update-weights-interval" in out
    assert "HEAVY []" in out
