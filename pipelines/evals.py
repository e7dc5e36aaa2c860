"""Evaluation during a run: before training, every `--eval-interval` steps in the background (the producers'
actor runs it while the trainer keeps training), and after training. A background result is logged at the step
whose weights it measured, not at the step it finished."""

from __future__ import annotations

import argparse
from typing import Any

import ray

from streamrl.metrics import MetricsLogger


class BackgroundEval:
    def __init__(self, args: argparse.Namespace, manager: Any, logger: MetricsLogger):
        self.args, self.manager, self.logger = args, manager, logger
        self.ref, self.started_at = None, 0  # the eval in flight and the step whose weights it measures

    def run_now(self, step: int, label: str) -> float | None:
        """Evaluate `step`'s weights and wait for it (before and after training); the reward, None without data."""
        if not self.args.eval_prompt_data:
            return None
        result = ray.get(self.manager.evaluate.remote(step))
        self.logger.log({"step": step, **result})
        print(f"[streamrl] eval {label} training: reward {result['eval/reward']:.3f}", flush=True)
        return result["eval/reward"]

    def poll(self, record: dict[str, Any]) -> None:
        """Log a finished background eval (its reward also goes into this step's status line)."""
        if self.ref is not None and ray.wait([self.ref], timeout=0)[0]:
            result = ray.get(self.ref)
            self.logger.log({"step": self.started_at, **result})
            record["eval/reward"] = result["eval/reward"]
            self.ref = None

    def maybe_start(self, step: int, total: int) -> None:
        """After train step `step`: start one every --eval-interval steps, one at a time, none at the end (the
        final eval follows)."""
        every = self.args.eval_interval
        if self.args.eval_prompt_data and every and self.ref is None and step % every == 0 and step < total:
            self.ref, self.started_at = self.manager.evaluate.remote(step), step

    def wait(self) -> None:
        if self.ref is not None:
            ray.get(self.ref)
