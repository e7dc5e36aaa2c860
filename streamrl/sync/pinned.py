"""Transport: host-pinned shared memory, for a trainer and engines on different GPUs of one host (or one GPU).

The trainer lays its weights out as the CUDA IPC buckets (same aligned layout, so the engine's flat weights take
each bucket in one copy), in ONE file in /dev/shm that both processes map and pin (cudaHostRegister): a sync is a
device-to-host copy on the trainer at pinned-memory speed and a host-to-device copy on the engine, no
serialization, no pickle. The engine maps the file once (`/update_weights_from_pinned`, a streamrl endpoint) and
only accepts paths this module creates. Once every engine has mapped it, the trainer removes the file's name (the
mappings stay), so nothing is left in /dev/shm however the job ends; engines must therefore all join before the
first sync, as with CUDA IPC handles.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from streamrl.sync.base import post_update
from streamrl.weights.layout import IpcBucket, aligned, bucket_layout
from streamrl.weights.pinned import PREFIX, UpdateWeightsFromPinnedRequest, bucket_views, map_file


class PinnedSender:
    """Trainer side: the file is created, mapped and pinned once per layout and refilled on every sync."""

    def __init__(self) -> None:
        self.layout: list | None = None
        self.linked = False
        self.request: UpdateWeightsFromPinnedRequest | None = None
        self.views: list[Any] = []

    def fill(self, named: list, bucket_bytes: int, dtype: Any = None) -> UpdateWeightsFromPinnedRequest:

        layout = [(n, t.dtype, tuple(t.shape)) for n, t in named]
        if layout != self.layout:
            self._allocate(named, bucket_bytes, dtype)
            self.layout = layout
        torch._foreach_copy_(self.views, [t.detach().reshape(-1) for _, t in named])  # D2H, pinned: async
        return self.request

    def _allocate(self, named: list, bucket_bytes: int, dtype: Any) -> None:
        target = [(t, dtype if dtype is not None and t.is_floating_point() else t.dtype) for _, t in named]
        layout = bucket_layout(target, bucket_bytes)
        buckets, byte_offsets, end = [], [], 0
        for dt, idx, offsets, numel in layout:
            end = aligned(end, 1)  # buckets start 256-byte aligned in the file
            byte_offsets.append(end)
            buckets.append(IpcBucket(handle=[], dtype=str(dt).replace("torch.", ""), numel=numel,
                                     names=[named[i][0] for i in idx], shapes=[list(named[i][1].shape) for i in idx],
                                     offsets=offsets))
            end += numel * dt.itemsize
        path = f"{PREFIX}{os.getpid()}-{len(buckets)}-{end}"
        host = map_file(path, end, create=True)
        self.linked = True  # the name is removed once every engine has mapped the file (see stage_pinned)
        atexit.register(lambda: os.path.exists(path) and os.unlink(path))
        flats = bucket_views(host, buckets, byte_offsets)
        self.views = [None] * len(named)
        for flat, (_, idx, offsets, _) in zip(flats, layout, strict=True):
            for i, off in zip(idx, offsets, strict=True):
                self.views[i] = flat[off : off + named[i][1].numel()]
        self.host = host
        self.request = UpdateWeightsFromPinnedRequest(path=path, nbytes=end, buckets=buckets,
                                                      byte_offsets=byte_offsets)


_SENDER = PinnedSender()


def stage_pinned(named: list, version: int, bucket_bytes: int, dtype: Any = None) -> Callable[[list[str]], dict]:
    """Phase 1 (engines may still generate): queue the device-to-host copies into the pinned file. Returns phase 2,
    `push(engine_urls)`: wait for them, post the layout, wait for every engine to confirm `version`."""
    t0 = time.time()
    req = _SENDER.fill(named, bucket_bytes, dtype)

    def push(engine_urls: list[str]) -> dict[str, float]:
        t1 = time.time()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the device-to-host copies into the file are asynchronous
        body = msgspec.msgpack.encode(msgspec.structs.replace(req, weight_version=str(version)))
        copy_s = post_update(engine_urls, "/update_weights_from_pinned", body, version, "pinned")
        if _SENDER.linked:  # every engine holds its own mapping now: drop the name so that a killed job (no
            _SENDER.linked = False  # atexit) leaves no 1 GB file behind in /dev/shm
            os.unlink(req.path)
        return {"sync_start": t0, "sync_push_time": time.time() - t1, "sync_engine_copy_time": copy_s,
                "sync_bytes": float(req.nbytes), "sync_buckets": float(len(req.buckets))}

    return push
