"""A trainer rank's parameters, gradients and optimizer state off the GPU and back (`--colocate`).

slime's names: a rank `sleep()`s while the engines generate on its GPU and `wake_up()`s to train; the group's
`offload()` / `onload()` (train/group.py) call them on every rank. Every model of the rank moves (policy, critic,
frozen reference and teacher) as `Module.to` moves it, which FSDP2 supports after sharding (it re-registers its
sharded parameters), so the Parameter objects, and with them the optimizer's references, stay the same; optimizer state
tensors on the rank's device move by their own entries. The copy is unconditional (`copy=True`), so on CPU the
round trip really moves the storages too (the tests check it). The trainer's CUDA IPC buckets go as well (they
also hold views of the weights), and the caching allocator's blocks are returned to the driver.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from streamrl.sync.cuda_ipc import release_sender
from streamrl.train.optim import local_optimizer

HOST = torch.device("cpu")


class RankOffload:
    """A base of FSDPTrainRank (and so of the Megatron rank): needs `model`, `ref_model`, `teacher`, `critic`,
    `opt`, `critic_opt` and `device`."""

    _moved_state: list[tuple[dict, str]] | None = None  # optimizer state entries taken off the device

    def _models(self) -> list[Any]:
        return [m for m in (self.model, self.ref_model, self.teacher, self.critic) if m is not None]

    def _optimizers(self) -> list[Any]:
        return [local_optimizer(o) for o in (self.opt, self.critic_opt) if o is not None]

    def sleep(self) -> dict[str, float]:
        """Parameters, gradients and optimizer state to host memory; the GPU memory back to the driver."""
        if self._moved_state is not None:
            return {}
        t0 = time.time()
        self._moved_state = []
        for opt in self._optimizers():
            for state in opt.state.values():
                for key, value in state.items():
                    # only what lives on the device: AdamW keeps `step` on the host unless it is capturable
                    if isinstance(value, torch.Tensor) and value.device == self.device:
                        state[key] = value.to(HOST, copy=True)
                        self._moved_state.append((state, key))
        with torch.no_grad():
            for m in self._models():
                _move(m, HOST)
        release_sender()
        return {"trainer_offload_time": time.time() - t0, **self._give_back()}

    def wake_up(self) -> dict[str, float]:
        """Everything `sleep` moved back onto the rank's device."""
        if self._moved_state is None:
            return {}
        t0 = time.time()
        with torch.no_grad():
            for m in self._models():
                _move(m, self.device)
        for state, key in self._moved_state:
            state[key] = state[key].to(self.device, copy=True)
        self._moved_state = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"trainer_onload_time": time.time() - t0}

    @property
    def asleep(self) -> bool:
        return self._moved_state is not None

    def _give_back(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        torch.cuda.synchronize(self.device)
        torch.cuda.ipc_collect()  # buckets the engine has let go of (engine/receive.py forget_ipc)
        torch.cuda.empty_cache()
        return {"trainer_gpu_bytes_asleep": float(torch.cuda.memory_reserved(self.device))}


def _move(module: torch.nn.Module, device: torch.device) -> None:
    """`module.to(device)`, copying even where it is already there (`Module.to` takes no `copy`; `_apply` is what
    it calls, and what FSDP2 overrides to re-register its sharded parameters)."""
    module._apply(lambda t: t.to(device, copy=True))
