"""slime's rollout-data debugging: save what each train step consumed, and train again on it without engines.

    --save-debug-rollout-data 'dumps/rollout_{rollout_id}.msgpack'   # any run: one file per train step
    --load-debug-rollout-data 'dumps/rollout_{rollout_id}.msgpack'   # train only: no engines, no weight sync

A file holds the step's groups exactly as the trainer got them (msgpack of `DebugRollout`: every `Sample` with its
tokens, log-probs, rewards and per-token versions) and the trainer's weight version at that step, so a replay builds
the same batch (same advantages, same staleness) and, from the same initial weights, the same first step. Use it to
debug a loss or an algorithm on fixed data, or to bisect a training problem without generation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import msgspec

from pipelines.launch import init_ray
from streamrl.metrics import MetricsLogger, plot_run
from streamrl.plugins import load_function
from streamrl.train.batch import build_train_batch, eos_id
from streamrl.train.group import TrainerGroup
from streamrl.types import Sample


class DebugRollout(msgspec.Struct, kw_only=True):
    rollout_id: int  # the train step (0-based) that consumed these groups
    version: int  # the trainer's weight version at that step (staleness = version - a sample's oldest token)
    groups: list[list[Sample]]


def debug_path(template: str, rollout_id: int) -> Path:
    try:
        return Path(template.format(rollout_id=rollout_id))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"debug rollout data path {template!r}: only {{rollout_id}} may be formatted ({e})") from None


def save_debug_rollout(template: str, rollout_id: int, version: int, groups: list[list[Sample]]) -> Path:
    path = debug_path(template, rollout_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.msgpack.encode(DebugRollout(rollout_id=rollout_id, version=version, groups=groups)))
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_debug_rollout(template: str, rollout_id: int) -> DebugRollout:
    path = debug_path(template, rollout_id)
    if not path.exists():
        raise FileNotFoundError(f"--load-debug-rollout-data: no file for rollout {rollout_id}: {path}")
    try:
        return msgspec.msgpack.decode(path.read_bytes(), type=DebugRollout)
    except msgspec.DecodeError as e:
        raise ValueError(f"--load-debug-rollout-data: {path} is not a saved rollout: {e}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train `--num-rollout` steps on saved rollouts (rollout ids 0, 1, ...): trainer ranks only."""

    total = args.num_rollout
    if not total:
        raise ValueError("--load-debug-rollout-data needs --num-rollout (how many saved rollouts to train on)")
    first = load_debug_rollout(args.load_debug_rollout_data, 0)  # fail on a bad path before starting anything
    run_dir = Path(args.run_dir or f"runs/debug-{time.strftime('%Y%m%d-%H%M%S')}")
    logger = MetricsLogger(args, run_dir, total)
    post = (load_function(args.custom_reward_post_process_path, what="--custom-reward-post-process-path")
            if args.custom_reward_post_process_path else None)
    init_ray(args)
    trainer = TrainerGroup(args)
    eos, t0, trained = eos_id(args.hf_checkpoint), time.time(), 0
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": total,
                               "debug_rollout_data": args.load_debug_rollout_data}
    try:
        for step in range(total):
            data = first if step == 0 else load_debug_rollout(args.load_debug_rollout_data, step)
            batch = build_train_batch(args, data.groups, data.version, eos, post)
            m = trainer.train_step(batch)
            trained += len(batch)
            elapsed = time.time() - t0
            record = {"step": step + 1, "reward": sum(batch.rewards) / len(batch), "version": data.version,
                      "samples_per_s": trained / elapsed, "buffer_fill": 0, "buffer_capacity": 0,
                      "staleness_mean": sum(batch.staleness) / len(batch), "staleness_max": max(batch.staleness),
                      "trainer_wait_frac": 0.0, "response_len": sum(batch.response_lengths) / len(batch), **m}
            logger.log(record)
            if (step + 1) % args.log_interval == 0 or step + 1 == total:
                print(logger.status_line(record), flush=True)
        summary["wall_time"] = time.time() - t0
        if args.save:
            trainer.save_hf(args.save)
        summary["plot"] = str(plot_run(run_dir))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        logger.close()
        trainer.shutdown()
