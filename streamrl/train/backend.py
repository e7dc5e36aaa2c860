"""The trainer-backend interface: what the training loop, the weight publisher and checkpoints need from a trainer.

`TrainerGroup` (FSDP2 ranks as Ray actors, train/group.py) implements it, and `MegatronTrainerGroup` (Megatron-core
ranks, train/megatron/) for `--train-backend megatron`. Every call addresses the whole group of ranks at once.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol, runtime_checkable

from streamrl.train.batch import TrainBatch
from streamrl.train.group import TrainerGroup


@runtime_checkable
class TrainerBackend(Protocol):
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One train step (`--num-mini-batches` optimizer steps) on the global batch; the step's metrics."""

    def stage_weights(self, version: int) -> dict[str, float]:
        """Weight sync phase 1, while the engines still generate: gather and pack the full weights."""

    def push_staged(self, engine_urls: list[str]) -> dict[str, float]:
        """Weight sync phase 2, engines paused: send what was staged to every engine, labelled `version`."""

    def offload(self) -> dict[str, float]:
        """--colocate: parameters, gradients and optimizer state to host memory while the engines generate on the
        same GPUs (slime's `offload`); a call that needs them on the device onloads them first."""

    def onload(self) -> dict[str, float]:
        """Back onto the device, to train (slime's `onload`)."""

    def full_named_parameters(self) -> list[tuple[str, Any]]:
        """The full (unsharded) parameters by HF name, on CPU (weight checks)."""

    def save_state(self, path: str) -> None:
        """Model + optimizer (+ critic) state to one file, loadable on any number of ranks."""

    def load_state(self, path: str) -> None: ...

    def save_hf(self, path: str) -> None:
        """The policy as an HF model directory (with the tokenizer)."""

    def shutdown(self) -> None: ...


def make_trainer(args: argparse.Namespace) -> TrainerBackend:
    """The backend `--train-backend` names (validation refuses the ones this build lacks)."""
    if args.train_backend == "fsdp":

        return TrainerGroup(args)
    if args.train_backend == "megatron":
        from streamrl.train.megatron.group import MegatronTrainerGroup  # megatron-core is optional

        return MegatronTrainerGroup(args)
    raise ValueError(f"--train-backend {args.train_backend}: no such backend in this build")
