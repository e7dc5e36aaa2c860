"""The trainer ranks as one object: create the Ray actors, wire torch.distributed, call every rank at once."""

from __future__ import annotations

import argparse
from typing import Any

import ray

from streamrl.placement import gpu_shares
from streamrl.train.batch import TrainBatch
from streamrl.train.fsdp import FSDPTrainRank


class TrainerGroup:
    rank_class: type = FSDPTrainRank  # the Ray actor of one rank (the Megatron backend's group swaps it)

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.world = args.actor_num_nodes * args.actor_num_gpus_per_node
        share = gpu_shares(args)[1]
        opts = {"num_gpus": share, "num_cpus": 0} if share else {"num_cpus": 0}
        env = {"env_vars": {"OMP_NUM_THREADS": str(args.train_torch_threads), "TOKENIZERS_PARALLELISM": "false"}}
        if args.train_mps_thread_percentage:  # the trainer's share of the SMs under MPS
            env["env_vars"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(args.train_mps_thread_percentage)
        if args.train_mps_low_priority:  # the engines' kernels first (MPS client priority, newer drivers)
            env["env_vars"]["CUDA_MPS_CLIENT_PRIORITY"] = "1"
        cls = ray.remote(**opts)(self.rank_class)
        self.ranks = [cls.options(runtime_env=env).remote(args, r, self.world) for r in range(self.world)]
        addr, port = ray.get(self.ranks[0].master_address.remote())
        # memory budget on a shared GPU: what the engines' --sglang-mem-fraction-static leaves (rounded down)
        frac = args.sglang_mem_fraction_static
        budget = None
        if share and share < 1 and frac and not args.colocate:  # colocated: the whole card while it trains
            engines_per_gpu = max(1, round((1 - share) / share))
            budget = max(0.05, 1 - engines_per_gpu * frac - 0.02)
        shares_gpu = bool(share) and share < 1
        self.info = ray.get([r.init.remote(addr, port, budget, shares_gpu) for r in self.ranks])
        self.asleep = False  # parameters, gradients and optimizer state offloaded (--colocate)

    def _all(self, method: str, *a: Any) -> list[Any]:

        return ray.get([getattr(r, method).remote(*a) for r in self.ranks])

    def _resident(self, method: str, *a: Any, stay: bool = False) -> list[Any]:
        """`_all` with the parameters on the device: an offloaded trainer is onloaded for the call and, unless
        `stay`, offloaded again after it (a checkpoint or an export in a colocated job)."""
        asleep = self.asleep
        if asleep:
            self.onload()
        try:
            return self._all(method, *a)
        finally:
            if asleep and not stay:
                self.offload()

    def offload(self) -> dict[str, float]:
        """Parameters, gradients and optimizer state of every rank to host memory (train/offload.py)."""
        self.asleep = True
        return self._all("sleep")[0]

    def onload(self) -> dict[str, float]:
        self.asleep = False
        return self._all("wake_up")[0]

    def train_step(self, batch: TrainBatch) -> dict[str, float]:

        ref = ray.put(batch)  # one copy in the object store, shared by every rank
        return self._resident("train_step", ref, stay=True)[0]

    def stage_weights(self, version: int) -> dict[str, float]:
        """Sync phase 1, while the engines still generate (see FSDPTrainRank.stage_weights)."""
        return self._resident("stage_weights", version, stay=True)[0]

    def push_staged(self, engine_urls: list[str]) -> dict[str, float]:
        """Sync phase 2, while the engines are paused."""
        return self._all("push_staged", engine_urls)[0]

    def full_named_parameters(self) -> list:
        return self._resident("full_named_parameters")[0]

    def save_hf(self, path: str) -> None:
        self._resident("save_hf", path)

    def save_state(self, path: str) -> None:
        """Model + optimizer state to one file (see FSDPTrainRank.save_state)."""
        self._resident("save_state", path)

    def load_state(self, path: str) -> None:
        self._resident("load_state", path)

    def shutdown(self) -> None:

        try:
            self._all("shutdown")
        finally:
            for r in self.ranks:
                ray.kill(r)
