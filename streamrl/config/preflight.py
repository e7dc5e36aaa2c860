"""Checks of the user's files and plug-ins, run by `train_async.py` after parsing and before Ray starts.

Everything here is a `ConfigError` naming the flag, file:line or plug-in, so a typo costs a second, not the ~15 s
of start-up: the checkpoint directory, every prompt file (read fully: JSON, keys, UTF-8, not empty), every
`--*-path` plug-in (imported and resolved as the run will), and response lengths against the model's context.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from streamrl.config.parser import ConfigError, set_job_length

# The --*-path plug-ins without a dedicated loader: flag -> (module, dict of built-in names) or None.
_PLUGINS = {
    "custom_generate_function_path": None, "rollout_function_path": None, "eval_function_path": None,
    "data_source_path": None, "custom_reward_post_process_path": None, "custom_loss_function_path": None,
    "custom_advantage_function_path": None, "custom_megatron_init_path": None,
    "custom_megatron_before_train_step_hook_path": None, "custom_megatron_before_log_prob_hook_path": None,
    "custom_tis_function_path": ("streamrl.algos.offpolicy", "BUILTIN_TIS_FUNCTIONS"),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def preflight(args: argparse.Namespace) -> None:
    """Raise ConfigError for the first problem with the run's files or plug-ins."""
    if args.loss_type == "sft_loss" and args.num_rollout is None:
        raise ConfigError("--loss-type sft_loss needs --num-rollout N (the number of SFT steps).")
    ctx = _check_checkpoint(args.hf_checkpoint, "--hf-checkpoint")
    if args.train_backend == "megatron" and os.path.isdir(args.hf_checkpoint):
        _check_megatron_arch(args)
    ctx = args.sglang_context_length or ctx  # SGLang serves what --sglang-context-length says
    for flag in ("ref_load", "opd_teacher_load"):  # HF checkpoints too, loaded by the trainer
        path = getattr(args, flag)
        megatron_dir = path and os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt"))
        if path and not (megatron_dir and args.train_backend == "megatron"):  # the Megatron rank reads those too
            _check_checkpoint(path, "--" + flag.replace("_", "-"))
    for flag in ("rollout_max_response_len", "eval_max_response_len"):  # the engine refuses what cannot fit
        n, prompt = getattr(args, flag, None), args.rollout_max_prompt_len
        if ctx is not None and n is not None and n + (prompt or 1) > ctx:
            raise ConfigError(f"--{flag.replace('_', '-')} ({n}) + the prompt ({prompt or 'at least 1'} tokens) "
                              f"exceeds the model's context length ({ctx}, max_position_embeddings of "
                              f"--hf-checkpoint): the engine would refuse every request. Lower it.")
    if args.prompt_data and not args.data_source_path:
        label = args.label_key or ("label" if args.loss_type == "sft_loss" else None)  # SFT trains on the label
        n_prompts = _check_prompts(args.prompt_data, "--prompt-data", args.input_key, label, args.metadata_key)
        set_job_length(args, n_prompts)  # --num-epoch counts the prompts
    if args.loss_type != "sft_loss":
        for name, path in getattr(args, "eval_datasets", []):
            _check_prompts(path, f"--eval-prompt-data ({name})", args.eval_input_key or args.input_key,
                           args.eval_label_key or args.label_key, args.metadata_key)
        _check_plugins(args)


def _check_megatron_arch(args: argparse.Namespace) -> None:
    """Megatron's architecture flags against the --hf-checkpoint config (the flag that disagrees, before Ray)."""
    from transformers import AutoConfig

    from streamrl.train.megatron.arch import resolve_arch

    try:
        resolve_arch(args, AutoConfig.from_pretrained(args.hf_checkpoint))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_checkpoint(path: str, flag: str) -> int | None:
    """The model's context length (max_position_embeddings) when `path` is a local HF directory."""
    if not os.path.exists(path):
        if _HUB_ID.match(path) and not os.environ.get("HF_HUB_OFFLINE"):
            return None  # a hub id ("org/name"): resolved by transformers at load time
        raise ConfigError(f"{flag} {path}: no such directory (an HF checkpoint: config.json, weights, tokenizer).")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ConfigError(f"{flag} {path}: not an HF checkpoint directory (no config.json).")
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config}: unreadable ({e}); check {flag}.") from None
    # with rope scaling the served context is longer than max_position_embeddings (SGLang scales it): not checked
    return None if cfg.get("rope_scaling") else cfg.get("max_position_embeddings")


def _check_prompts(path: str, flag: str, input_key: str, label_key: str | None, metadata_key: str) -> int:
    from streamrl.data import DataError, load_prompts

    try:
        records, _ = load_prompts(path, input_key, label_key, metadata_key)
    except DataError as e:
        raise ConfigError(f"{e} (check {flag}, --input-key, --label-key)") from None
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror or e}.") from None
    if not records:
        raise ConfigError(f"{flag} {path}: no prompts (the file is empty).")
    return len(records)


def _check_plugins(args: argparse.Namespace) -> None:
    import importlib

    from buffers.filters import load_buffer_filter
    from streamrl.plugins import load_function
    from streamrl.rollout.dynamic_filters import load_dynamic_filter, load_sample_filter
    from streamrl.rollout.rewards import load_group_reward_fn, load_reward_fn

    checks = [("--custom-rm-path", lambda: (load_group_reward_fn if args.group_rm else load_reward_fn)(args)),
              ("--dynamic-sampling-filter-path", lambda: load_dynamic_filter(args.dynamic_sampling_filter_path)),
              ("--rollout-sample-filter-path", lambda: load_sample_filter(args.rollout_sample_filter_path)),
              ("--buffer-filter-path", lambda: load_buffer_filter(args.buffer_filter_path))]
    for name, where in _PLUGINS.items():
        spec = getattr(args, name)
        if spec:
            builtins = getattr(importlib.import_module(where[0]), where[1]) if where else None
            flag = "--" + name.replace("_", "-")
            checks.append((flag, lambda spec=spec, builtins=builtins, flag=flag: load_function(spec, builtins, flag)))
    for flag, load in checks:
        try:
            load()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - the user's module failed to import: name it, keep it one line
            raise ConfigError(f"{flag}: importing the plug-in failed: {type(e).__name__}: {e}") from None
