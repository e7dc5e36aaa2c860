"""Cross-field rules of the rollout side (engines, router, passthrough flags, plug-ins, eval), called by `validate()`.

Each error names the flag to change. Derived values set here: `args.eval_datasets` ([(name, path), ...]),
`args.over_sampling_batch_size`, `args.eval_max_response_len`, `args.eval_function_path`, `args.router_mode`
("none" | "local" | "external").
"""

from __future__ import annotations

import argparse
import os


def _eval_datasets(spec: list[str] | None, error: type[Exception]) -> list[tuple[str, str]]:
    if not spec:
        return []
    if isinstance(spec, str):  # programmatic use: default_args(eval_prompt_data="eval.jsonl")
        spec = [spec]
    if len(spec) == 1:  # a single path: named after its file (slime names it "aime")
        return [(os.path.splitext(os.path.basename(spec[0]))[0], spec[0])]
    if len(spec) % 2:
        raise error(f"--eval-prompt-data takes `name path` pairs (or one path), got {len(spec)} values: {spec}")
    pairs = [(spec[i], spec[i + 1]) for i in range(0, len(spec), 2)]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise error(f"--eval-prompt-data: dataset names must be unique, got {names}")
    return pairs


# SGLang server flags the embedded engine honours too, with SGLang's meaning (the others need real SGLang)
EMBEDDED_ENGINE_SGLANG_FLAGS = {"mem_fraction_static", "max_prefill_tokens", "num_continuous_decode_steps"}


def validate_rollout(args: argparse.Namespace, error: type[Exception]) -> None:
    from streamrl.passthrough import set_values

    if (args.sglang_router_ip is None) != (args.sglang_router_port is None):
        raise error("--sglang-router-ip and --sglang-router-port go together (an external router).")
    if args.sglang_router_ip is not None:
        args.router_mode = "external"
    elif args.rollout_engine == "sglang" or args.use_router:
        args.router_mode = "local"
    else:
        args.router_mode = "none"
    sglang_set = set(set_values("sglang", args)) - EMBEDDED_ENGINE_SGLANG_FLAGS
    if sglang_set and args.rollout_engine != "sglang":
        flag = "--sglang-" + sorted(sglang_set)[0].replace("_", "-")
        raise error(f"{flag} is an SGLang server flag: it needs --rollout-engine sglang.")
    router_set = set_values("router", args)
    if router_set and args.router_mode != "local":
        flag = "--router-" + sorted(router_set)[0].replace("_", "-")
        why = "an external router (--sglang-router-ip) is configured by its owner" if args.router_mode == "external" \
            else "no router is started: add --use-router (or --rollout-engine sglang)"
        raise error(f"{flag} configures the router streamrl starts, but {why}.")
    if args.rollout_engine_startup_timeout <= 0:
        raise error("--rollout-engine-startup-timeout must be > 0.")
    if args.max_turns is not None and args.max_turns < 1:
        raise error("--max-turns must be >= 1.")
    if args.prefill_num_servers:
        raise error("--prefill-num-servers (prefill/decode disaggregation) is not available in this build: the "
                    "embedded engine prefills and decodes in one process and SGLang's PD servers are not started; "
                    "drop the flag.")

    if args.over_sampling_batch_size is None:
        args.over_sampling_batch_size = args.rollout_batch_size
    if args.over_sampling_batch_size < args.rollout_batch_size:
        raise error(f"--over-sampling-batch-size ({args.over_sampling_batch_size}) must be >= --rollout-batch-size "
                    f"({args.rollout_batch_size}).")
    if args.group_rm and not args.custom_rm_path:
        raise error("--group-rm needs --custom-rm-path (`async def rm(args, samples) -> list[float]`).")
    if args.rm_timeout is not None and args.rm_timeout < 0:
        raise error("--rm-timeout must be >= 0 seconds (0: no limit).")
    if args.rm_timeout == 0:
        args.rm_timeout = None
    if args.rollout_stream and args.custom_generate_function_path:
        raise error("--rollout-stream applies to the built-in generate; a --custom-generate-function-path streams "
                    "itself (streamrl.rollout.generate.generate_streaming).")

    args.eval_datasets = _eval_datasets(args.eval_prompt_data, error)
    if args.eval_max_response_len is None:
        args.eval_max_response_len = args.rollout_max_response_len
    if args.eval_function_path is None:
        args.eval_function_path = args.rollout_function_path
    if args.n_samples_per_eval_prompt < 1:
        raise error("--n-samples-per-eval-prompt must be >= 1.")
