"""`--colocate` (train.py): trainer and engines on the same GPUs, taking turns. The whole sequence lives here.

    generate        engines resident, trainer offloaded (parameters, gradients, optimizer state on the host)
    before_train    pause the engines (abort: in-flight requests go back to the producers), release all their
                    memory (/release_memory_occupation {}), onload the trainer
    train           the loop's train step, the GPU to itself
    publish         resume the engines' weights, sync (CUDA IPC on one GPU: stage, pause, push, new version,
                    continue; requests stay held while the KV cache is released), offload the trainer, resume the
                    KV cache and the decode graphs: generation goes on
    (slime's order: offload train -> onload_weights -> update_weights -> onload_kv; here the trainer syncs from
    its device copy, so it goes to the host after the push)

slime's --no-offload-train keeps the trainer resident (no onload/offload), --no-offload-rollout the engines (no
release/resume; they are paused while the trainer trains all the same): for models where both fit, and the
trainer's offload is the slow part of a colocated step.

Each step's metrics carry where the time went (`colocate_*_time`) and when each phase began (`colocate_t_*`,
seconds since the epoch), which scripts/gpu/colocate_memory.py matches with its memory samples.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from streamrl.sync.base import post_json
from streamrl.sync.publisher import WeightPublisher

KV_TAGS = ["kv_cache", "cuda_graph"]  # slime's onload_kv


class ColocatedPublisher(WeightPublisher):
    def __init__(self, components: Any, args: argparse.Namespace) -> None:
        super().__init__(components, args.pause_generation_mode)
        self.offload_train, self.offload_rollout = args.offload_train, args.offload_rollout
        self.paused = False  # the engines are paused for training (and their memory given back with offload_rollout)
        self.phases: dict[str, float] = {}
        if not args.load and self.offload_train:  # a resumed job publishes first (begin), and offloads then
            self.phases.update(self.c.trainer.offload())
        self.phases["colocate_t_generate"] = time.time()

    def _engines(self, path: str, body: dict) -> float:
        t0 = time.time()
        for url in self.c.engine_urls:
            post_json(url, path, body)
        return time.time() - t0

    def before_train(self) -> None:
        t0 = time.time()
        if not self.paused:
            self.phases["colocate_t_release"] = t0
            self._engines("/pause_generation", {"mode": "abort"})  # a release needs no running request
            if self.offload_rollout:
                self.phases["colocate_release_time"] = self._engines("/release_memory_occupation", {})
            self.paused = True
        if self.offload_train:
            self.phases.update(self.c.trainer.onload())
        self.phases["colocate_t_train"] = time.time()

    def publish(self, version: int) -> dict[str, float]:
        phases, self.phases = self.phases, {}
        phases["colocate_t_sync"] = time.time()
        if self.paused and self.offload_rollout:
            phases["colocate_resume_weights_time"] = self._engines("/resume_memory_occupation", {"tags": ["weights"]})
        stats = super().publish(version)  # onloads the trainer if it slept (a resumed job's first publish)
        phases["colocate_t_offload"] = time.time()
        if self.offload_train:
            phases.update(self.c.trainer.offload())
        if self.paused:
            if self.offload_rollout:
                phases["colocate_resume_kv_time"] = self._engines("/resume_memory_occupation", {"tags": KV_TAGS})
            self.paused = False
        self.phases["colocate_t_generate"] = time.time()
        return {**stats, **phases}


def make_publisher(components: Any, args: argparse.Namespace) -> WeightPublisher:
    """The loop's publisher: colocated with --colocate, else the engines keep their own GPUs."""
    if args.colocate:
        return ColocatedPublisher(components, args)
    return WeightPublisher(components, args.pause_generation_mode)
