"""streamrl entry point: asynchronous RL training with slime's flags.

    python train_async.py --hf-checkpoint ckpt --prompt-data train.jsonl --label-key label \
        --rollout-batch-size 8 --n-samples-per-prompt 8 --async-buffer-size 16 --update-weights-interval 1 ...

`--help` is instant: no torch, ray or transformers import happens before the flags are parsed.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    from streamrl.config import ConfigError, parse_args

    try:
        args = parse_args(argv)
    except ConfigError as e:
        sys.exit(f"streamrl: error: {e}")
    if args.load_debug_rollout_data:  # train only, on saved rollouts (slime's --debug-train-only)
        if not args.hf_checkpoint:
            sys.exit("streamrl: error: --hf-checkpoint is required")
        from pipelines.debug_train import run as run_debug

        return run_debug(args)
    if not args.hf_checkpoint or not args.prompt_data:
        sys.exit("streamrl: error: --hf-checkpoint and --prompt-data are required")
    if args.loss_type == "sft_loss":
        from pipelines.sft import run_sft

        return run_sft(args)
    from pipelines.async_loop import run

    return run(args)


if __name__ == "__main__":
    main()
