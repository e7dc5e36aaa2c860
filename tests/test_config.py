"""Flags: slime's names, frozen list, cross-field errors that name the flag to change, instant --help."""

import subprocess
import sys
from pathlib import Path

import pytest

from streamrl.config import ConfigError, build_parser, default_args, parse_args

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
    # rollout plug-ins, SGLang, router, eval
    "--rollout-engine", "--rollout-function-path", "--custom-generate-function-path", "--group-rm",
    "--dynamic-sampling-filter-path", "--over-sampling-batch-size", "--rollout-sample-filter-path",
    "--data-source-path", "--eval-prompt-data", "--n-samples-per-eval-prompt", "--eval-interval",
    "--eval-temperature", "--eval-max-response-len", "--skip-eval-before-train", "--eval-function-path",
    "--sglang-router-ip", "--sglang-router-port", "--sglang-router-request-timeout-secs", "--sglang-server-concurrency",
    "--sglang-mem-fraction-static", "--sglang-context-length", "--sglang-log-level", "--router-policy",
    "--router-balance-abs-threshold",
    # RL math
    "--disable-grpo-std-normalization", "--disable-rewards-normalization", "--normalize-advantages", "--gamma",
    "--lambd", "--kl-coef", "--value-clip", "--num-critic-only-steps", "--use-opd", "--opd-kl-coef",
    "--opd-teacher-load", "--custom-advantage-function-path", "--custom-loss-function-path",
    "--calculate-per-token-loss", "--eps-clip-c", "--kl-loss-type", "--entropy-coef", "--custom-tis-function-path",
    "--use-rollout-logprobs", "--true-on-policy-mode", "--use-opsm", "--opsm-delta",
    "--tis-threshold",  # named by summaries of slime's docs, absent from slime's source: accepted, then refused
]


def test_slime_flag_names_exist():
    options = {s for a in build_parser()._actions for s in a.option_strings}
    missing = [f for f in SLIME_FLAGS if f not in options]
    assert not missing


def test_offload_flags_default_on_with_colocate_as_slime():
    a = default_args(colocate=True)
    assert a.offload_train is True and a.offload_rollout is True
    a = default_args(colocate=True, offload=False)
    assert a.offload_train is False and a.offload_rollout is False
    a = default_args(colocate=True, offload=False, offload_rollout=True)
    assert a.offload_train is False and a.offload_rollout is True
    a = parse_args(["--hf-checkpoint", "x", "--colocate", "--no-offload-train"])
    assert a.offload_train is False and a.offload_rollout is True
    a = default_args()
    assert a.offload_train is False and a.offload_rollout is False


def test_slime_debug_and_decoding_flags():
    assert default_args().rollout_skip_special_tokens is True  # streamrl's default (slime keeps them)
    assert parse_args(["--hf-checkpoint", "x", "--no-rollout-skip-special-tokens"]).rollout_skip_special_tokens is False
    with pytest.raises(ConfigError, match="--debug-train-only .*--load-debug-rollout-data"):
        default_args(debug_train_only=True)
    assert default_args(load_debug_rollout_data="d/r_{rollout_id}.msgpack").debug_train_only is True
    assert default_args().debug_train_only is False


def test_derived_values():
    a = default_args(rollout_batch_size=4, n_samples_per_prompt=4, num_steps_per_rollout=2, eps_clip=0.3)
    assert a.global_batch_size == 8 and a.eps_clip_high == 0.3 and a.rollout_num_engines == 1
    a = default_args(rollout_num_gpus=8, rollout_num_gpus_per_engine=2)
    assert a.rollout_num_engines == 4


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"colocate": True, "rollout_engine": "sglang"}, "--colocate"),
        ({"colocate": True, "train_backend": "megatron", "actor_num_gpus_per_node": 2}, "without data parallelism"),
        ({"offload_train": True}, "--offload-train .*needs --colocate"),
        ({"save_hf": "out/{step}"}, "--save-hf"),
        ({"offload": True}, "--offload .*needs --colocate"),
        ({"rollout_temperature": 0.0}, "--rollout-temperature"),
        ({"rollout_num_gpus": 3, "rollout_num_gpus_per_engine": 2}, "--rollout-num-gpus"),
        ({"global_batch_size": 12, "n_samples_per_prompt": 8}, "--n-samples-per-prompt"),
        ({"async_buffer_size": 2, "rollout_batch_size": 8}, "--async-buffer-size"),
        ({"mask_offpolicy_in_partial_rollout": True}, "--partial-rollout"),
        ({"pause_generation_mode": "in_place"}, "--partial-rollout"),
        ({"pause_generation_mode": "in_place", "partial_rollout": True, "rollout_engine": "sglang"}, "embedded"),
        ({"pause_generation_mode": "in_place", "partial_rollout": True, "mask_offpolicy_in_partial_rollout": True},
         "abort only"),
        ({"use_kl_loss": True}, "--kl-loss-coef"),
        ({"actor_num_gpus_per_node": 3}, "--global-batch-size"),
        ({"use_mps": True, "ray_address": "auto"}, "--use-mps"),
        ({"use_dynamic_batch_size": True}, "--max-tokens-per-gpu"),
        ({"engine_mps_thread_percentage": 30}, "--engine-mps-thread-percentage"),
        ({"use_mps": True, "engine_mps_thread_percentage": 0}, "--engine-mps-thread-percentage"),
        ({"train_mps_thread_percentage": 70}, "--train-mps-thread-percentage"),
        ({"use_mps": True, "train_mps_thread_percentage": 101}, "--train-mps-thread-percentage"),
        ({"train_mps_low_priority": True}, "--train-mps-low-priority"),
        ({"use_unbiased_kl": True}, "--use-unbiased-kl"),
        ({"load_debug_rollout_data": "a_{rollout_id}", "save_debug_rollout_data": "b_{rollout_id}"},
         "--load-debug-rollout-data"),
        ({"log_probs_chunk_size": 0}, "--log-probs-chunk-size"),
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


@pytest.mark.parametrize(
    "overrides, flags",
    [
        ({"kl_coef": 0.1, "advantage_estimator": "ppo", "use_kl_loss": True, "kl_loss_coef": 0.1},
         ["--kl-coef", "--use-kl-loss"]),
        ({"kl_coef": 0.1}, ["--kl-coef", "--use-kl-loss"]),  # grpo ignores reward shaping: say so
        ({"disable_tis": True}, ["--max-staleness", "--use-tis", "--use-rollout-logprobs",
                                 "--allow-uncorrected-offpolicy"]),
        ({"advantage_estimator": "reinforce_plus_plus"}, ["--normalize-advantages"]),
        ({"use_opd": True}, ["--opd-teacher-load"]),
        ({"loss_type": "custom_loss"}, ["--custom-loss-function-path"]),
        ({"calculate_per_token_loss": True, "loss_normalizer_constant": 64.0},
         ["--calculate-per-token-loss", "--loss-normalizer-constant"]),
        ({"eps_clip_c": 1.0}, ["--eps-clip-c"]),
        ({"true_on_policy_mode": True}, ["--sglang-server-concurrency"]),
        ({"true_on_policy_mode": True, "sglang_server_concurrency": 1, "engine_torch_threads": 2},
         ["--engine-torch-threads", "--train-torch-threads"]),
        ({"num_critic_only_steps": 2}, ["--advantage-estimator"]),
    ],
)
def test_algo_combinations_name_the_flags(overrides, flags):
    with pytest.raises(ConfigError) as e:
        default_args(**overrides)
    assert all(f in str(e.value) for f in flags), str(e.value)


def test_offpolicy_correction_defaults():
    a = default_args()  # streamrl corrects by default with the clip anchored at µ (docs/offpolicy.md)
    assert a.use_rollout_logprobs and not a.use_tis and a.max_staleness > 0
    for over in ({"use_tis": True}, {"tis_mode": "mask"}, {"tis_level": "geometric"}, {"tis_clip": 1.5},
                 {"custom_tis_function_path": "icepop"}):  # TIS, asked for by --use-tis or any TIS flag
        b = default_args(**over)
        assert b.use_tis and not b.use_rollout_logprobs, over
    for over in ({"disable_tis": True, "max_staleness": 0}, {"disable_tis": True, "allow_uncorrected_offpolicy": True}):
        b = default_args(**over)
        assert not b.use_tis and not b.use_rollout_logprobs
    with pytest.raises(ConfigError, match="--use-rollout-logprobs"):
        default_args(use_tis=True, use_rollout_logprobs=True)
    b = default_args(disable_tis=True, use_rollout_logprobs=True)
    assert b.use_rollout_logprobs and not b.use_tis
    # --use-tis / --no-use-tis is a real boolean flag: --no-use-tis keeps the default correction, refuses TIS flags
    assert parse_args(["--use-tis"]).use_tis is True
    b = parse_args(["--no-use-tis"])
    assert b.use_tis is False and b.use_rollout_logprobs
    with pytest.raises(ConfigError, match="--tis-clip"):
        default_args(use_tis=False, tis_clip=1.5)
    for over, flag in (({"num_mini_batches": 3}, "--num-mini-batches"), ({"m2_threshold": 0.0}, "--m2-threshold"),
                       ({"staleness_decay": 1.5}, "--staleness-decay")):
        with pytest.raises(ConfigError, match=flag):
            default_args(**over)


@pytest.mark.parametrize("script", sorted(Path(__file__).resolve().parents[1].glob("scripts/models/*.sh")),
                         ids=lambda p: p.name)
def test_model_scripts_flags_parse(script):
    """Every scripts/models/*.sh defines MODEL_ARGS that streamrl's parser accepts (no stale or misspelt flag)."""
    out = subprocess.run(["bash", "-c", f'source "{script}" && printf "%s\\n" "${{MODEL_ARGS[@]}}"'],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    flags = [x for x in out if x]
    assert flags, f"{script.name} defines no MODEL_ARGS"
    parse_args([*flags, "--hf-checkpoint", "m", "--prompt-data", "p.jsonl"])


def test_slime_multi_turn_and_pd_flags():
    from streamrl.config import ConfigError, default_args

    assert default_args(max_turns=5).max_turns == 5 and default_args().max_turns is None
    with pytest.raises(ConfigError, match="--max-turns must be >= 1"):
        default_args(max_turns=0)
    with pytest.raises(ConfigError, match="--prefill-num-servers .* not available"):
        default_args(prefill_num_servers=1)


def test_job_length_is_derived_during_validation():
    """--num-rollout from --num-epoch and the default --lr-decay-iters are set by validation (preflight counts the
    prompts), never by the loops afterwards."""
    from streamrl.config.parser import set_job_length, steps_total

    a = default_args(num_rollout=6, num_steps_per_rollout=2, rollout_batch_size=4, n_samples_per_prompt=2)
    assert a.lr_decay_iters == 12 == steps_total(a)
    b = default_args(num_rollout=None, num_epoch=3, rollout_batch_size=4)
    assert b.num_rollout is None and b.lr_decay_iters is None  # the prompts are not counted yet
    set_job_length(b, num_prompts=10)
    assert (b.num_rollout, b.lr_decay_iters) == (7, 7)  # 3 epochs x 10 prompts // 4 per rollout
    assert default_args(lr_decay_iters=3).lr_decay_iters == 3  # a given value stays
