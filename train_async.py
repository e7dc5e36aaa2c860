"""streamrl entry point: asynchronous RL training with slime's flags.

    python train_async.py --hf-checkpoint ckpt --prompt-data train.jsonl --label-key label \
        --rollout-batch-size 8 --n-samples-per-prompt 8 --async-buffer-size 16 --update-weights-interval 1 ...

`--help` is instant: no torch, ray or transformers import happens before the flags are parsed. A user error (a
flag, a file, a plug-in) ends the run with one `streamrl: error: ...` line, checked before Ray starts where possible;
`--debug` (or STREAMRL_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import time


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix (a flag, a file, a plug-in); None for a bug."""
    from streamrl.config import ConfigError
    from streamrl.data import DataError

    cause = getattr(e, "cause", None)  # a Ray task error wraps the actor's exception
    if isinstance(cause, BaseException) and cause is not e:
        return _user_error(cause)
    if isinstance(e, ConfigError | DataError):
        return str(e)
    if isinstance(e, FileNotFoundError | IsADirectoryError | PermissionError | UnicodeDecodeError):
        return f"{type(e).__name__}: {e}"
    return None


def main(argv: list[str] | None = None, synchronous: bool = False) -> dict:
    """Run the job the flags describe. `synchronous`: slime's `train.py` loop (train.py) instead of the async one."""
    t_command = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("STREAMRL_DEBUG", "") not in ("", "0")
    try:
        return _finish(_run(argv, synchronous), t_command)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        msg = None if debug else _user_error(e)
        if msg is None:
            raise
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        sys.exit(f"streamrl: error: {first}")


def _run(argv: list[str], synchronous: bool = False) -> dict:
    from streamrl.config import ConfigError, parse_args
    from streamrl.config.preflight import preflight

    args = parse_args(argv)
    if args.colocate and not synchronous:  # slime's train_async.py asserts the same
        raise ConfigError("--colocate needs train.py (trainer and engines take turns on the GPUs); train_async.py "
                          "overlaps them on separate devices: use train.py or drop --colocate.")
    if not args.hf_checkpoint:
        raise ConfigError("--hf-checkpoint is required (an HF model directory; scripts/prepare_demo.py makes one).")
    if args.load_debug_rollout_data:  # train only, on saved rollouts (slime's --debug-train-only)
        from pipelines.debug_train import run as run_debug

        return run_debug(args)
    if not args.prompt_data and not args.data_source_path:
        raise ConfigError("--prompt-data is required (a JSONL file with one prompt object per line).")
    preflight(args)
    if args.run_dir is None:  # named here so that Ray's logs can be linked into it as soon as Ray starts
        args.run_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    if args.loss_type == "sft_loss":
        from pipelines.sft import run_sft

        return run_sft(args)
    if synchronous:
        from pipelines.synchronous import run as run_synchronous

        return run_synchronous(args)
    from pipelines.async_loop import run

    return run(args)


def _finish(summary: dict, t_command: float) -> dict:
    """Complete an RL run's summary.json with the whole command's time (`wall_time` is the training loop only) and
    say what the groups left in the buffer are."""
    import json
    from pathlib import Path

    if not isinstance(summary, dict) or "ledger" not in summary:
        return summary  # SFT, debug-train: nothing to add
    summary["command_time"] = time.time() - t_command
    summary["startup_and_teardown_time"] = summary["command_time"] - summary.get("wall_time", 0.0)
    path = Path(summary["run_dir"]) / "summary.json"
    if path.exists():
        path.write_text(json.dumps(summary, indent=1))
    left = {k: summary["ledger"].get(k, 0) for k in ("queued", "partial", "in_flight")}
    if any(left.values()):
        tokens = sum((summary.get("tokens") or {}).get("carried", {}).values())
        print(f"[streamrl] left untrained: {left['queued']} queued + {left['partial']} partial groups ({tokens} "
              f"tokens): generated ahead for steps after the last one (the look-ahead --max-staleness and "
              f"--async-buffer-size allow); kept in the final checkpoint with --save-interval, else dropped",
              flush=True)
    print(f"[streamrl] {summary['command_time']:.0f} s in all: {summary.get('wall_time', 0):.0f} s training, "
          f"{summary['startup_and_teardown_time']:.0f} s start-up, evals and shutdown; {summary['run_dir']}",
          flush=True)
    return summary


if __name__ == "__main__":
    main()
