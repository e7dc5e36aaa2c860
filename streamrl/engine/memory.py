"""SGLang's `/release_memory_occupation` and `/resume_memory_occupation` for the embedded engine (`--colocate`).

Trainer and engines take turns on one GPU: the engine gives its memory back while the trainer trains and takes
it again to generate. The request body is SGLang's, `{"tags": [...]}` with its tags "weights", "kv_cache" and
"cuda_graph"; no tags (or `{}`, or `[]`) means all three, as in SGLang's scheduler. The contract:

  * the state is the set of released tags; releasing a released tag again is a no-op;
  * a release needs an engine with no running request (SGLang asserts the same): send `/pause_generation` first,
    else 400. Requests that arrive while anything is released wait in the queue, as during a pause, and run once
    every tag is resumed;
  * a resume without tags takes back every released tag (newer SGLang's rule); resuming a named tag that is not
    released is a 400 (SGLang's scheduler raises KeyError there); an unknown tag is a 400 naming the known ones;
  * "weights": every parameter storage is copied to host memory (pinned on CUDA, kept for the next release) and
    resized to 0 bytes; a resume reallocates it and copies the weights back, so they are intact (the next sync
    overwrites them anyway). A weight update while the weights are released is refused (400);
  * "kv_cache": the slot cache's storage is resized to 0 (the dynamic cache is cleared);
  * "cuda_graph": the captured decode graphs are dropped and captured again at the next decode. Releasing the
    weights or the KV cache drops them too: a graph holds the addresses of both.

On CPU the weights loaded from a safetensors file are memory-mapped (their storages cannot be resized): there is
nothing to give back and they stay, but the state machine, the queueing and the refusals are the same.
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

from .scheduler import Scheduler

ALL_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES


class MemoryOccupationRequest(msgspec.Struct, kw_only=True):
    tags: list[str] | None = None  # None or []: every tag


class MemoryOccupation:
    """The released tags of one engine and what each release keeps to resume it. Thread-safe (one lock)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.sch = scheduler
        self.released: set[str] = set()
        self._host: list[tuple[Any, torch.Tensor]] = []  # (parameter storage, host copy), kept between releases
        self._lock = threading.Lock()

    @staticmethod
    def _tags(tags: list[str] | None) -> list[str]:
        tags = list(tags or ALL_TAGS)
        unknown = [t for t in tags if t not in ALL_TAGS]
        if unknown:
            raise ValueError(f"unknown memory tag(s) {unknown}; the tags are {list(ALL_TAGS)}")
        return tags

    def release(self, tags: list[str] | None = None) -> list[str]:
        """Give back the memory of `tags`; returns the tags released by this call. ValueError: unknown tag, or a
        request is running."""
        tags = self._tags(tags)
        with self._lock:
            new = [t for t in tags if t not in self.released]
            if not new:
                return []
            if not self.sch.hold():
                raise ValueError("release_memory_occupation needs an engine with no running request: send "
                                 "/pause_generation first")
            self.sch.run_exclusive(lambda model: self._free(model, new))
            self.released.update(new)
            self.sch.weights_released = "weights" in self.released
            return new

    def resume(self, tags: list[str] | None = None) -> list[str]:
        """Take the memory of `tags` (none: every released one) again, weights restored; generation goes on once
        nothing is released."""
        with self._lock:
            tags = self._tags(tags) if tags else sorted(self.released)
            missing = [t for t in tags if t not in self.released]
            if missing:
                raise ValueError(f"resume_memory_occupation: {missing} not released (released: "
                                 f"{sorted(self.released)})")
            self.sch.run_exclusive(lambda model: self._take(tags))
            self.released.difference_update(tags)
            self.sch.weights_released = "weights" in self.released
            if not self.released:
                self.sch.unhold()
            return tags

    # ---- the memory ------------------------------------------------------------------------------------------
    def _free(self, model: torch.nn.Module, tags: list[str]) -> None:
        kv = self.sch.kv
        kv.drop_graphs()  # every tag invalidates them: they hold the weights' and the cache's addresses
        if "kv_cache" in tags:
            kv.release()
        if "weights" in tags:
            self._offload_weights(model)
        if self.sch.device.type == "cuda":
            torch.cuda.synchronize(self.sch.device)
            torch.cuda.empty_cache()

    def _take(self, tags: list[str]) -> None:
        if "weights" in tags:
            for storage, host in self._host:
                storage.resize_(host.numel())
                _bytes_of(storage).copy_(host, non_blocking=True)
        if "kv_cache" in tags:
            self.sch.kv.resume()
        if self.sch.device.type == "cuda":
            torch.cuda.synchronize(self.sch.device)

    def _offload_weights(self, model: torch.nn.Module) -> None:
        storages = {}
        for p in model.parameters():  # tied weights share one storage: copied once
            s = p.untyped_storage()
            if s.resizable() and s.nbytes():  # a memory-mapped file (CPU) has nothing to give back
                storages.setdefault(s.data_ptr(), s)
        kept = {host.numel(): host for _, host in self._host}  # pinned buffers are slow to allocate: reuse them
        pin = self.sch.device.type == "cuda"
        self._host = []
        for s in storages.values():
            host = kept.pop(s.nbytes(), None)
            if host is None:
                host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin)
            host.copy_(_bytes_of(s))
            s.resize_(0)
            self._host.append((s, host))

    def state(self) -> dict[str, Any]:
        """For /server_info: the released tags and the bytes kept on the host."""
        return {"memory_released": sorted(self.released),
                "memory_host_bytes": sum(h.numel() for _, h in self._host) if "weights" in self.released else 0}

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        async def call(request: HttpRequest, fn: Any, verb: str) -> Response:
            try:
                raw = await request.body()
                body = msgspec.json.decode(raw if raw.strip() else b"{}", type=MemoryOccupationRequest)
                t0 = time.perf_counter()
                tags = await anyio.to_thread.run_sync(fn, body.tags)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                return _json({"success": False, "message": str(e)}, 400)
            return _json({"success": True, "message": f"{verb} {tags}", "time": time.perf_counter() - t0})

        async def release(request: HttpRequest) -> Response:
            return await call(request, self.release, "released")

        async def resume(request: HttpRequest) -> Response:
            return await call(request, self.resume, "resumed")

        both = ["GET", "POST"]  # SGLang serves both
        return [Route("/release_memory_occupation", release, methods=both),
                Route("/resume_memory_occupation", resume, methods=both)]


def _bytes_of(storage: Any) -> torch.Tensor:
    """A uint8 tensor over a whole untyped storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")
