"""Transport: CUDA IPC on one GPU (trainer and engine as separate processes on the same card).

The trainer flattens parameters into per-dtype buckets (`--update-weight-buffer-size` bytes each), exports each
bucket's CUDA memory handle, and posts the handles with the names/shapes/offsets to the engine's
`/update_weights_from_ipc`; the engine maps the bucket and copies slices into its parameters on the device (no host
round trip, no pickle: the handle fields are plain bytes and ints in msgpack).

Everything that costs host time is done once per job, not per sync: buckets are allocated and exported once (the
trainer keeps them alive), the engine opens each handle once, and both sides keep their lists of slice views, so
a sync is one multi-tensor copy on each side (`torch._foreach_copy_`: a few kernels for hundreds of tensors) plus
three small HTTP calls. The trainer casts into the engine's dtype while packing (fp32 master weights -> bf16
buckets), so the engine's copy never converts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from streamrl.sync.base import post_update
from streamrl.weights.layout import IpcBucket, UpdateWeightsFromIpcRequest, bucket_layout


class IpcSender:
    """Trainer side: flat per-dtype buckets allocated and exported once, refilled on every sync."""

    def __init__(self) -> None:
        self.layout: list | None = None
        self.flats: list[Any] = []
        self.buckets: list[IpcBucket] = []
        self.views: list[Any] = []  # bucket slice for named[i], in the caller's order
        self.sources: tuple[list, list[Any]] = ([], [])  # (key, flattened sources) of the last fill
        self.dtype: Any = None

    def fill(self, named: list, bucket_bytes: int, dtype: Any = None) -> list[IpcBucket]:
        """Copy `named` [(name, tensor)] into the buckets (floating tensors cast to `dtype` if given)."""

        # Same names at the same addresses as last time: the cached flat views (which keep those storages alive,
        # so an equal address is the same storage) read the current values; skips ~1 ms of per-tensor host work.
        key = [(n, t.data_ptr(), t.dtype, t.shape) for n, t in named]
        if key != self.sources[0] or dtype != self.dtype:
            layout = [(n, t.dtype, tuple(t.shape), t.device) for n, t in named]
            if layout != self.layout or dtype != self.dtype:
                self.flats, self.buckets, self.views = _allocate(named, bucket_bytes, dtype)
                self.layout, self.dtype = layout, dtype
            self.sources = (key, [t.reshape(-1) for _, t in named])
        torch._foreach_copy_(self.views, self.sources[1])
        return self.buckets


def _allocate(named: list, bucket_bytes: int, dtype: Any) -> tuple[list[Any], list[IpcBucket], list[Any]]:

    def target(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    flats, buckets, views = [], [], [None] * len(named)
    for dt, idx, offsets, numel in bucket_layout([(t, target(t)) for _, t in named], bucket_bytes):
        flat = torch.empty(numel, dtype=dt, device=named[idx[0]][1].device)
        for i, off in zip(idx, offsets, strict=True):
            views[i] = flat[off : off + named[i][1].numel()]
        flats.append(flat)
        buckets.append(IpcBucket(handle=list(flat.untyped_storage()._share_cuda_()),
                                 dtype=str(dt).replace("torch.", ""), numel=numel, names=[named[i][0] for i in idx],
                                 shapes=[list(named[i][1].shape) for i in idx], offsets=offsets))
    return flats, buckets, views


_SENDER = IpcSender()


def release_sender() -> None:
    """Drop the buckets and the cached views of the weights (which keep their storages alive): a colocated trainer
    frees its GPU memory between syncs (train/offload.py); the next sync allocates and exports new buckets."""
    global _SENDER
    _SENDER = IpcSender()


def stage_ipc(named: list, version: int, bucket_bytes: int, dtype: Any = None) -> Callable[[list[str]], dict]:
    """Trainer side, phase 1 (engines may still be generating): queue the packing copies into the shared buckets.
    Returns phase 2, `push(engine_urls)`: wait for the copies, post the handles, and wait for every engine to
    confirm `version`. `dtype`: the engines' weight dtype (floating tensors are cast while packing)."""
    t0 = time.time()
    buckets = _SENDER.fill(named, bucket_bytes, dtype)  # asynchronous on the device: overlaps the pause request

    def push(engine_urls: list[str]) -> dict[str, float]:
        t1 = time.time()
        torch.cuda.synchronize()  # the engine reads the buckets from another process: they must be written
        t_packed = time.time()
        body = msgspec.msgpack.encode(UpdateWeightsFromIpcRequest(buckets=buckets, weight_version=str(version)))
        copy_s = post_update(engine_urls, "/update_weights_from_ipc", body, version, "IPC")
        nbytes = sum(f.numel() * f.element_size() for f in _SENDER.flats)
        return {"sync_start": t0, "sync_push_time": time.time() - t1, "sync_pack_wait_time": t_packed - t1,
                "sync_engine_copy_time": copy_s, "sync_bytes": float(nbytes), "sync_buckets": float(len(buckets))}

    return push


def push_ipc(engine_urls: list[str], named: list, version: int, bucket_bytes: int,
             dtype: Any = None) -> dict[str, float]:
    """Both phases at once (see `stage_ipc`)."""
    return stage_ipc(named, version, bucket_bytes, dtype)(engine_urls)
