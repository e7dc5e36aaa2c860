"""argparse generated from `flags.py`, plus the cross-field rules (each error names the flag to change)."""

from __future__ import annotations

import argparse
import dataclasses
import re

from streamrl.config.flags import GROUPS, all_fields

_SCALARS = {"int": int, "float": float, "str": str}


class ConfigError(ValueError):
    """A flag combination that cannot work; the message names the flag to change."""


def _scalar(annotation: str) -> tuple[type | None, bool]:
    """('int | None' -> int, is_list=False); ('list[int] | None' -> int, True); 'bool' -> None."""
    base = annotation.replace(" | None", "").strip()
    if base.startswith("list["):
        return _SCALARS[base[5:-1]], True
    return _SCALARS.get(base), False


_PASSTHROUGH_GROUPS = ("sglang", "router")


class _Parser(argparse.ArgumentParser):
    """`--help` lists streamrl's and slime's flags by group; `--help-sglang` the `--sglang-*` / `--router-*`
    passthrough (about 2,000 lines). A bad flag is one `streamrl: error:` line (exit 2), not a page of usage."""

    show_passthrough = False

    def format_help(self) -> str:
        groups = self._action_groups
        self._action_groups = [g for g in groups if (g.title in _PASSTHROUGH_GROUPS) == self.show_passthrough]
        try:
            return super().format_help()
        finally:
            self._action_groups = groups

    def error(self, message: str):
        self.exit(2, f"streamrl: error: {message} (see --help, or --help-sglang for --sglang-*/--router-*)\n")


class _HelpPassthrough(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.show_passthrough = True
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train_async.py",
        usage="%(prog)s [--flag VALUE ...]   (--help: streamrl's and slime's flags; --help-sglang: the passthrough)",
        description="streamrl: asynchronous RL post-training (slime-compatible flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--help-sglang", nargs=0, action=_HelpPassthrough, default=argparse.SUPPRESS,
                        help="Show the --sglang-* and --router-* passthrough flags (SGLang's and sglang-router's own).")
    for title, cls in GROUPS.items():
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            if f.type == "bool":
                group.add_argument(flag, action="store_true", default=f.default, help=help_text)
                continue
            if f.type == "bool | None":  # --flag / --no-flag; None: not said, validation decides
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
                continue
            typ, is_list = _scalar(f.type)
            if is_list:
                meta.setdefault("nargs", "*")
            group.add_argument(flag, type=typ, default=f.default, help=help_text, **meta)
    from streamrl.passthrough import add_passthrough_args

    add_passthrough_args(parser)  # --sglang-<flag>, --router-<flag> (snapshot or installed package)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate(args)
    return args


def default_args(**overrides) -> argparse.Namespace:
    """Defaults for every flag with `overrides` applied (for tests and programmatic use), validated."""
    args = build_parser().parse_args([])
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise ConfigError(f"unknown flag --{k.replace('_', '-')}")
        setattr(args, k, v)
    validate(args)
    return args


# Counts that must be >= 1 (None: unset, allowed); checked first so that no later rule divides by zero.
_AT_LEAST_ONE = ("n_samples_per_prompt", "rollout_batch_size", "rollout_max_response_len", "num_rollout", "num_epoch",
                 "global_batch_size", "micro_batch_size", "num_steps_per_rollout", "actor_num_nodes",
                 "actor_num_gpus_per_node", "rollout_num_gpus_per_engine")


def _check_ranges(args: argparse.Namespace) -> None:
    for name in _AT_LEAST_ONE:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if not args.lr >= 0 or args.lr == float("inf"):  # `not >=` also catches NaN
        raise ConfigError(f"--lr must be a finite number >= 0, got {args.lr}.")
    if args.rollout_top_k < -1 or args.rollout_top_k == 0:
        raise ConfigError(f"--rollout-top-k must be -1 (off) or >= 1, got {args.rollout_top_k} (SGLang refuses 0).")


def _validate_reward(args: argparse.Namespace) -> None:
    if "remote_rm" in (args.rm_type, args.custom_rm_path) and not args.rm_url:
        raise ConfigError("--rm-type remote_rm posts each sample to a reward server: give its --rm-url.")


def _validate_colocate(args: argparse.Namespace) -> None:
    """--colocate's own rules; train_async.py refuses it outright (train_async._run). slime's offload flags:
    --offload sets both; with --colocate each defaults to on; without it they have nothing to offload."""
    for flag in ("offload_train", "offload_rollout"):
        if getattr(args, flag) is None:
            setattr(args, flag, args.offload if args.offload is not None else args.colocate)
    if not args.colocate:
        named = [f for f in ("offload", "offload_train", "offload_rollout") if getattr(args, f)]
        if named:
            raise ConfigError(f"--{named[0].replace('_', '-')} takes turns on shared GPUs: it needs --colocate "
                              f"(train.py).")
        return
    clash = [f for f, on in (("--rollout-engine sglang", args.rollout_engine == "sglang"),
                             ("--debug-rollout-only", args.debug_rollout_only)) if on]
    if clash:
        raise ConfigError(f"--colocate works with the embedded engine (the engine's memory release and the CUDA IPC "
                          f"sync are streamrl's): drop {clash[0]} or --colocate.")
    ranks = args.actor_num_nodes * args.actor_num_gpus_per_node
    if args.train_backend == "megatron" and ranks > args.tensor_model_parallel_size:
        # torch DDP keeps its gradient buckets on the GPU and cannot follow its parameters to the host and back
        raise ConfigError(f"--colocate with --train-backend megatron runs without data parallelism: "
                          f"--tensor-model-parallel-size ({args.tensor_model_parallel_size}) must equal the trainer "
                          f"ranks ({ranks}).")


def validate(args: argparse.Namespace) -> None:
    """Fill derived values and reject impossible combinations, naming the flag to change."""
    _check_ranges(args)
    _validate_reward(args)
    _validate_colocate(args)
    if args.debug_rollout_only:
        clash = [f for f, on in (("--load-debug-rollout-data", args.load_debug_rollout_data), ("--save", args.save),
                                 ("--load", args.load), ("--check-weight-update-equal",
                                                         args.check_weight_update_equal)) if on]
        if clash:
            raise ConfigError(f"--debug-rollout-only runs no trainer: drop {clash[0]}.")
        args.max_staleness = 2**31 - 1  # the weights never change: admission is bounded by the buffer alone
    if args.debug_train_only and not args.load_debug_rollout_data:
        raise ConfigError("--debug-train-only trains on saved rollouts: give --load-debug-rollout-data (files written "
                          "by --save-debug-rollout-data).")
    args.debug_train_only = bool(args.load_debug_rollout_data)  # slime: loading debug rollouts means train only
    if args.rollout_skip_special_tokens is None:
        args.rollout_skip_special_tokens = True
    if args.load_debug_rollout_data and args.save_debug_rollout_data:
        raise ConfigError("--load-debug-rollout-data trains on saved rollouts; --save-debug-rollout-data would "
                          "write rollouts that are not generated: use one of them.")
    if args.use_unbiased_kl and not args.use_kl_loss:
        raise ConfigError("--use-unbiased-kl weights the KL loss: it needs --use-kl-loss.")
    if args.log_probs_chunk_size == 0 or args.log_probs_chunk_size < -1:
        raise ConfigError(f"--log-probs-chunk-size must be -1 (off) or > 0, got {args.log_probs_chunk_size}.")
    if args.use_dynamic_batch_size and not (args.max_tokens_per_gpu and args.max_tokens_per_gpu > 0):
        raise ConfigError("--use-dynamic-batch-size needs --max-tokens-per-gpu N (padded tokens per micro-batch).")
    if args.use_mps and args.ray_address:
        raise ConfigError("--use-mps starts the MPS daemon with the local Ray cluster; with --ray-address start "
                          "`nvidia-cuda-mps-control -d` on the nodes yourself and drop --use-mps.")
    if args.engine_mps_thread_percentage is not None and not (
            args.use_mps and 1 <= args.engine_mps_thread_percentage <= 100):
        raise ConfigError("--engine-mps-thread-percentage needs --use-mps and a value in 1..100.")
    if args.train_mps_thread_percentage is not None and not (
            args.use_mps and 1 <= args.train_mps_thread_percentage <= 100):
        raise ConfigError("--train-mps-thread-percentage needs --use-mps and a value in 1..100.")
    if args.train_mps_low_priority and not args.use_mps:
        raise ConfigError("--train-mps-low-priority needs --use-mps.")
    from streamrl.config.megatron_flags import validate_megatron

    validate_megatron(args, ConfigError)  # parallel sizes, architecture flags, hooks
    from streamrl.config.speed_flags import validate_speed

    validate_speed(args, ConfigError)  # --qkv-format, --attn-implementation
    from streamrl.config.rollout_rules import validate_rollout

    validate_rollout(args, ConfigError)  # engines, router, passthrough, plug-ins, eval datasets
    if args.rollout_temperature <= 0:
        raise ConfigError("--rollout-temperature must be > 0 (the trainer divides logits by it).")
    if args.save_interval is not None and (args.save_interval < 1 or not args.save):
        raise ConfigError("--save-interval needs --save DIR (the checkpoint directory) and must be >= 1.")
    if args.ref_update_interval is not None and (args.ref_update_interval < 1 or not (args.use_kl_loss
                                                                                     or args.kl_coef > 0)):
        raise ConfigError("--ref-update-interval refreshes the reference model of --use-kl-loss / --kl-coef (give "
                          "one) and must be >= 1.")
    if args.only_train_params_name_list and args.freeze_params_name_list:
        raise ConfigError("--only-train-params-name-list and --freeze-params-name-list exclude each other (as in "
                          "slime): give one.")
    for flag in ("only_train_params_name_list", "freeze_params_name_list"):
        for pat in getattr(args, flag) or []:
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"--{flag.replace('_', '-')} {pat!r}: not a regular expression ({e})") from None
    if args.save_hf is not None:
        try:
            args.save_hf.format(rollout_id=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"--save-hf {args.save_hf!r}: the only placeholder is {{rollout_id}} ({e!r})") from None
    if args.ckpt_step is not None and not args.load:
        raise ConfigError("--ckpt-step picks a checkpoint to resume from: it needs --load DIR.")
    if args.keep_latest_k < 0:
        raise ConfigError("--keep-latest-k must be >= 0 (0 keeps every checkpoint).")
    if args.rollout_health_check_interval < 0 or args.rollout_health_check_timeout <= 0:
        raise ConfigError("--rollout-health-check-interval must be >= 0 (0: no probes) and "
                          "--rollout-health-check-timeout > 0.")
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.eval_temperature is None:
        args.eval_temperature = args.rollout_temperature
    if args.rollout_num_engines is None:
        gpus = args.rollout_num_gpus if args.rollout_num_gpus is not None else args.rollout_num_gpus_per_engine
        if gpus % args.rollout_num_gpus_per_engine:
            raise ConfigError(
                f"--rollout-num-gpus ({gpus}) must be a multiple of --rollout-num-gpus-per-engine "
                f"({args.rollout_num_gpus_per_engine})."
            )
        args.rollout_num_engines = gpus // args.rollout_num_gpus_per_engine
    if args.rollout_num_engines < 1:
        raise ConfigError("--rollout-num-engines must be >= 1.")
    n = args.n_samples_per_prompt
    if args.global_batch_size is None:
        total = args.rollout_batch_size * n
        if total % args.num_steps_per_rollout:
            raise ConfigError(
                f"--rollout-batch-size x --n-samples-per-prompt ({total}) must be divisible by "
                f"--num-steps-per-rollout ({args.num_steps_per_rollout})."
            )
        args.global_batch_size = total // args.num_steps_per_rollout
    if args.global_batch_size % n:
        raise ConfigError(f"--global-batch-size ({args.global_batch_size}) must be a multiple of "
                          f"--n-samples-per-prompt ({n}): the trainer consumes whole groups.")
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    if args.train_backend == "megatron":  # TP/PP peers share their samples: the batch splits over DP ranks only
        world = max(1, world // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                                 * getattr(args, "context_parallel_size", 1)))
    if args.global_batch_size % (world * args.micro_batch_size):
        raise ConfigError(
            f"--global-batch-size ({args.global_batch_size}) must be divisible by data-parallel trainer ranks "
            f"({world}) x --micro-batch-size ({args.micro_batch_size})."
        )
    if args.num_mini_batches < 1 or args.global_batch_size % (args.num_mini_batches * world):
        raise ConfigError(
            f"--global-batch-size ({args.global_batch_size}) must be divisible by --num-mini-batches "
            f"({args.num_mini_batches}) x data-parallel trainer ranks ({world}).")
    if args.m2_threshold is not None and args.m2_threshold <= 0:
        raise ConfigError("--m2-threshold must be > 0 (leave it unset to turn the M2 trust region off).")
    if not 0.0 < args.staleness_decay <= 1.0:
        raise ConfigError("--staleness-decay must be in (0, 1] (1: off).")
    if args.mask_offpolicy_in_partial_rollout and not args.partial_rollout:
        raise ConfigError("--mask-offpolicy-in-partial-rollout needs --partial-rollout.")
    if args.pause_generation_mode == "in_place" and not args.partial_rollout:
        raise ConfigError("--pause-generation-mode in_place keeps interrupted generations: it needs "
                          "--partial-rollout.")
    if args.pause_generation_mode == "in_place" and args.rollout_engine == "sglang":
        raise ConfigError("--pause-generation-mode in_place needs the embedded engine: SGLang reports one "
                          "weight_version per response, so the tokens before the update would be attributed to the "
                          "new version (staleness under-counted). Use abort with --rollout-engine sglang.")
    if args.pause_generation_mode == "in_place" and args.mask_offpolicy_in_partial_rollout:
        raise ConfigError("--mask-offpolicy-in-partial-rollout works with --pause-generation-mode abort only "
                          "(an in-place request comes back as one response).")
    if args.max_staleness < 0:
        raise ConfigError("--max-staleness must be >= 0.")
    if args.max_reuse < 1:
        raise ConfigError("--max-reuse must be >= 1 (1 = every group is trained once).")
    if args.async_buffer_max_tokens is not None and args.async_buffer_max_tokens < 1:
        raise ConfigError("--async-buffer-max-tokens must be >= 1 (leave it unset for no token bound).")
    if args.update_weights_interval < 1:
        raise ConfigError("--update-weights-interval must be >= 1.")
    if args.loss_type == "sft_loss":  # the SFT loop reads data directly: no buffer, no rollout
        set_job_length(args)
        return
    if args.async_buffer_size < args.global_batch_size // n:
        raise ConfigError(
            f"--async-buffer-size ({args.async_buffer_size} groups) must hold at least one train step "
            f"({args.global_batch_size // n} groups = --global-batch-size / --n-samples-per-prompt)."
        )
    if args.rollout_max_groups_in_flight is None:
        args.rollout_max_groups_in_flight = args.async_buffer_size
    if args.use_kl_loss and args.kl_loss_coef <= 0:
        raise ConfigError("--use-kl-loss needs --kl-loss-coef > 0.")
    if args.tis_clip_low > args.tis_clip:
        raise ConfigError("--tis-clip-low must be <= --tis-clip.")
    validate_algo(args)
    if args.num_rollout is None and args.num_epoch is None:
        args.num_rollout = 10
    set_job_length(args)


_MIS_FLAGS = ("use_rs", "rs_level", "rs_lower_bound", "rs_upper_bound", "rs_veto_threshold", "tis_batch_normalize")


def validate_mis(args: argparse.Namespace, mis_flags: list[str]) -> None:
    """Rejection sampling, veto and batch normalisation (slime's MIS example) act on the built-in TIS weights; the
    --use-rs bounds are resolved here as slime resolves them."""
    if args.tis_threshold is not None:
        raise ConfigError("--tis-threshold is not a slime flag (slime's source has none; third-party summaries of its "
                          "docs name it): bound the TIS weights with --tis-clip and --tis-clip-low.")
    if not mis_flags:
        return
    flag = "--" + mis_flags[0].replace("_", "-")
    if not args.use_tis:
        raise ConfigError(f"{flag} acts on the TIS weights: drop --disable-tis / --use-rollout-logprobs / "
                          "--no-use-tis.")
    if args.custom_tis_function_path:
        raise ConfigError(f"{flag} is part of the built-in TIS; --custom-tis-function-path replaces it (its function "
                          "does its own rejection): drop one of them.")
    if args.tis_batch_normalize and args.tis_level == "geometric":
        raise ConfigError("--tis-batch-normalize needs --tis-level token or sequence (slime defines no geometric "
                          "normalisation).")
    if args.rs_veto_threshold is not None and args.rs_veto_threshold <= 0:
        raise ConfigError("--rs-veto-threshold must be > 0.")
    rs_only = [f for f in mis_flags if f in ("rs_level", "rs_lower_bound", "rs_upper_bound")]
    if rs_only and not args.use_rs:
        raise ConfigError(f"--{rs_only[0].replace('_', '-')} configures rejection sampling: add --use-rs.")
    if args.use_rs:
        if args.rs_upper_bound is None:
            args.rs_upper_bound = args.tis_clip
        if args.rs_lower_bound is None:
            args.rs_lower_bound = args.tis_clip_low if args.tis_clip_low > 0 else 1.0 / args.tis_clip
        if not 0 <= args.rs_lower_bound <= args.rs_upper_bound:
            raise ConfigError(f"--rs-lower-bound ({args.rs_lower_bound}) must be in [0, --rs-upper-bound "
                              f"({args.rs_upper_bound})].")


def validate_algo(args: argparse.Namespace) -> None:
    """RL-math rules: estimators, loss reductions, off-policy correction.

    Off-policy correction is ON by default. With no correction flag, streamrl uses --use-rollout-logprobs (the PPO
    ratio and clip anchored at the behaviour policy µ), the correction that kept ≥ 90% of sync's gain up to
    --max-staleness 8 on both tasks of scripts/bench/staleness_sweep.py (docs/offpolicy.md); token TIS did not at 4.
    TIS (slime's opt-in --use-tis) is chosen by --use-tis or, unless --no-use-tis, by any TIS flag set away from its
    default (--tis-mode, --tis-level, --tis-clip, --tis-clip-low, --custom-tis-function-path); it and
    --use-rollout-logprobs exclude each other (TIS's ratio would be 1). --disable-tis turns the default off: with
    --max-staleness > 0 the data comes from older policies, and training on it with no correction is refused
    unless --allow-uncorrected-offpolicy.
    """
    tis_flags = [f.name for f in all_fields() if f.name in ("tis_mode", "tis_level", "tis_clip", "tis_clip_low",
                                                             "custom_tis_function_path", *_MIS_FLAGS)
                 and getattr(args, f.name) != f.default]
    if args.use_tis is False and tis_flags:
        raise ConfigError(f"--no-use-tis turns TIS off, but --{tis_flags[0].replace('_', '-')} configures it: drop "
                          "one of them.")
    tis_asked = args.use_tis or (args.use_tis is None and bool(tis_flags))
    if args.use_rollout_logprobs and args.use_tis:
        raise ConfigError("--use-tis and --use-rollout-logprobs exclude each other (with pi_old = pi_rollout the TIS "
                          "ratio is 1): keep one.")
    if args.disable_tis:  # no TIS, and no default correction (an explicit --use-rollout-logprobs stays)
        args.use_tis = False
    elif not args.use_rollout_logprobs:
        args.use_tis = bool(tis_asked)
        args.use_rollout_logprobs = not tis_asked  # the default correction
    args.use_tis = bool(args.use_tis)  # decided: a plain boolean from here on
    est = args.advantage_estimator
    if args.kl_coef < 0 or args.kl_loss_coef < 0:
        raise ConfigError("--kl-coef and --kl-loss-coef must be >= 0.")
    if args.kl_coef > 0 and args.use_kl_loss:
        raise ConfigError("--kl-coef (KL reward shaping) and --use-kl-loss/--kl-loss-coef (KL loss) are mutually "
                          "exclusive: keep one of them.")
    if args.kl_coef > 0 and est not in ("ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        raise ConfigError(f"--kl-coef shapes token rewards only for --advantage-estimator ppo, reinforce_plus_plus "
                          f"and reinforce_plus_plus_baseline, not {est}; use --use-kl-loss --kl-loss-coef instead.")
    if est in ("reinforce_plus_plus", "reinforce_plus_plus_baseline") and not args.normalize_advantages:
        raise ConfigError(f"--advantage-estimator {est} needs --normalize-advantages (its returns are whitened).")
    if not (0.0 <= args.gamma <= 1.0 and 0.0 <= args.lambd <= 1.0):
        raise ConfigError("--gamma and --lambd must be in [0, 1].")
    if est == "ppo" and args.value_clip <= 0:
        raise ConfigError("--value-clip must be > 0.")
    if args.num_critic_only_steps and est != "ppo":
        raise ConfigError("--num-critic-only-steps needs --advantage-estimator ppo (the only one with a critic).")
    if (args.use_opd or est == "on_policy_distillation") and not args.opd_teacher_load:
        raise ConfigError("on-policy distillation (--use-opd or --advantage-estimator on_policy_distillation) "
                          "needs --opd-teacher-load (an HF checkpoint of the teacher).")
    if args.loss_type == "custom_loss" and not args.custom_loss_function_path:
        raise ConfigError("--loss-type custom_loss needs --custom-loss-function-path.")
    if args.calculate_per_token_loss and args.loss_normalizer_constant is not None:
        raise ConfigError("--calculate-per-token-loss and --loss-normalizer-constant are mutually exclusive.")
    if args.loss_normalizer_constant is not None and args.loss_normalizer_constant <= 0:
        raise ConfigError("--loss-normalizer-constant must be > 0.")
    if args.eps_clip_c is not None and args.eps_clip_c <= 1.0:
        raise ConfigError("--eps-clip-c (dual clip) must be > 1.")
    if args.custom_tis_function_path and not args.use_tis:
        raise ConfigError("--custom-tis-function-path needs TIS on (drop --disable-tis / --use-rollout-logprobs).")
    validate_mis(args, [f for f in tis_flags if f in _MIS_FLAGS])
    if args.true_on_policy_mode and args.sglang_server_concurrency != 1:
        raise ConfigError("--true-on-policy-mode needs --sglang-server-concurrency 1: the trainer can replay an "
                          "engine's numerics only for requests decoded alone (see streamrl/train/onpolicy.py).")
    if args.true_on_policy_mode and args.engine_torch_threads != args.train_torch_threads:
        raise ConfigError("--true-on-policy-mode needs --engine-torch-threads == --train-torch-threads (the CPU "
                          "kernels' summation order depends on the thread count).")
    if args.max_staleness > 0 and not (args.use_tis or args.use_rollout_logprobs) \
            and not args.allow_uncorrected_offpolicy:
        raise ConfigError(
            f"--max-staleness {args.max_staleness} trains on data from older policies, but no off-policy correction "
            "is on (--disable-tis): drop --disable-tis (the default --use-rollout-logprobs), or pass --use-tis, or "
            "--max-staleness 0, or force it with --allow-uncorrected-offpolicy."
        )


def set_job_length(args: argparse.Namespace, num_prompts: int | None = None) -> None:
    """Derived during validation, never after: --num-rollout from --num-epoch (needs the prompt count, so preflight
    calls this again once it has read --prompt-data) and the default --lr-decay-iters (the whole job, as Megatron)."""
    if args.num_rollout is None and args.num_epoch is not None:
        if num_prompts is None:
            return  # preflight counts the prompts
        args.num_rollout = max(1, args.num_epoch * num_prompts // args.rollout_batch_size)
    if args.num_rollout is not None and args.lr_decay_iters is None:
        args.lr_decay_iters = steps_total(args)


def steps_total(args: argparse.Namespace) -> int:
    """Train steps of the whole job."""
    if args.num_rollout is None:
        raise ConfigError("--num-epoch needs --prompt-data to count prompts (or give --num-rollout)")
    return args.num_rollout * args.num_steps_per_rollout
