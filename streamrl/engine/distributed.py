"""SGLang's `/init_weights_update_group`, `/update_weights_from_distributed` and `/destroy_weights_update_group` for
the embedded engine (the wire contract and the group: streamrl/weights/distributed.py).

The engine is one process with one TP rank, so its rank is `rank_offset`. A bucket is received into empty tensors
of the announced dtypes and shapes, one broadcast from rank 0 each, then loaded like every other update
(`Scheduler.update_weights`: names and shapes checked, between forwards, the version moved). Once a group exists,
every announced bucket is received even when it cannot be loaded (weights released, unknown name), so that the
trainer's broadcasts never hang; the answer is then a 400 naming the cause and the old weights stay.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import msgspec
import torch
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from streamrl.weights.distributed import (
    DestroyWeightsUpdateGroupRequest,
    InitWeightsUpdateGroupRequest,
    UpdateWeightsFromDistributedRequest,
    broadcast,
    check_init,
    destroy,
    new_group,
)
from streamrl.weights.tensor import dtype_of

from .memory import _json
from .scheduler import Scheduler

_BAD = (msgspec.DecodeError, msgspec.ValidationError, ValueError)


class WeightsUpdateGroups:
    """The weight-update groups this engine has joined, by name."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.sch = scheduler
        self.groups: dict[str, Any] = {}
        self._lock = threading.Lock()  # one receive at a time per engine: broadcasts arrive in order

    def init(self, req: InitWeightsUpdateGroupRequest) -> None:
        check_init(req)
        if req.group_name in self.groups:
            raise ValueError(f"group {req.group_name!r} exists: POST /destroy_weights_update_group first")
        if req.backend == "nccl" and self.sch.device.type != "cuda":
            raise ValueError("backend nccl needs an engine on a GPU; use gloo on CPU")
        try:
            self.groups[req.group_name] = new_group(req.backend, req.world_size, req.rank_offset, req.group_name,
                                                    address=req.master_address, port=req.master_port)
        except (RuntimeError, ValueError) as e:  # the rendezvous timed out or was refused
            raise ValueError(f"joining {req.group_name!r} at {req.master_address}:{req.master_port} as rank "
                             f"{req.rank_offset} of {req.world_size} failed: {type(e).__name__}: {e}") from None

    def receive(self, req: UpdateWeightsFromDistributedRequest) -> float:
        """Receive one bucket and load it; returns the seconds spent. ValueError: malformed or not loadable."""
        pg = self.groups.get(req.group_name)
        if pg is None:
            raise ValueError(f"unknown group {req.group_name!r} (joined: {sorted(self.groups)}): POST "
                             f"/init_weights_update_group first")
        if not len(req.names) == len(req.dtypes) == len(req.shapes):
            raise ValueError(f"names, dtypes and shapes differ in length: {len(req.names)}, {len(req.dtypes)}, "
                             f"{len(req.shapes)}")
        dtypes = [dtype_of(d) for d in req.dtypes]
        t0 = time.perf_counter()
        with self._lock:
            tensors = [torch.empty(s, dtype=d, device=self.sch.device) for s, d in zip(req.shapes, dtypes, strict=True)]
            broadcast(pg, tensors)
        self.sch.update_weights(list(zip(req.names, tensors, strict=True)), req.weight_version)
        if self.sch.device.type == "cuda":
            torch.cuda.synchronize(self.sch.device)
        return time.perf_counter() - t0

    def destroy(self, req: DestroyWeightsUpdateGroupRequest) -> None:
        pg = self.groups.pop(req.group_name, None)
        if pg is None:
            raise ValueError(f"unknown group {req.group_name!r} (joined: {sorted(self.groups)})")
        destroy(pg)

    def routes(self) -> list[Route]:
        async def call(request: HttpRequest, typ: type, fn: Any) -> Response:
            try:
                body = msgspec.json.decode(await request.body(), type=typ)
                out = await anyio.to_thread.run_sync(fn, body)
            except _BAD as e:
                return _json({"success": False, "message": str(e)}, 400)
            return _json({"success": True, "message": "", **({"copy_time": out} if out is not None else {})})

        async def init(request: HttpRequest) -> Response:
            return await call(request, InitWeightsUpdateGroupRequest, self.init)

        async def update(request: HttpRequest) -> Response:
            return await call(request, UpdateWeightsFromDistributedRequest, self.receive)

        async def destroy_group(request: HttpRequest) -> Response:
            return await call(request, DestroyWeightsUpdateGroupRequest, self.destroy)

        return [Route("/init_weights_update_group", init, methods=["POST"]),
                Route("/update_weights_from_distributed", update, methods=["POST"]),
                Route("/destroy_weights_update_group", destroy_group, methods=["POST"])]
