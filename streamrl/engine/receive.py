"""The engine's side of the CUDA IPC and pinned-memory weight transports: open what the trainer shared (once per
bucket or file) and build the device copies that load it (plans kept per bucket)."""

from __future__ import annotations

import os
from typing import Any

import torch

from streamrl.weights.layout import IpcBucket, copy_plan, numel
from streamrl.weights.pinned import PREFIX, UpdateWeightsFromPinnedRequest, bucket_views, map_file

_OPENED: dict[bytes, tuple[Any, list[tuple[str, Any]]]] = {}  # engine side: handle -> (flat, views), opened once
_PLANS: dict[bytes, list[tuple[Any, Any]]] = {}  # engine side: bucket -> [(destination, source)] copies


def _key(b: IpcBucket) -> bytes:
    h = b.handle
    return bytes(h[1]) + h[3].to_bytes(8, "little") + repr((b.dtype, b.numel, b.names, b.offsets)).encode()


def open_buckets(buckets: list[IpcBucket]) -> list[tuple[str, Any]]:
    """Engine side: views into the trainer's buckets, [(name, tensor)] (handles opened once per bucket)."""

    out = []
    for b in buckets:
        key = _key(b)
        hit = _OPENED.get(key)
        if hit is None:
            h = b.handle
            storage = torch.UntypedStorage._new_shared_cuda(h[0], bytes(h[1]), h[2], h[3], bytes(h[4]), h[5],
                                                            bytes(h[6]) if h[6] else h[6], h[7])
            flat = torch.empty(0, dtype=getattr(torch, b.dtype), device=f"cuda:{h[0]}").set_(storage, 0, (b.numel,))
            views = [(name, flat[off : off + numel(shape)].view(shape))
                     for name, shape, off in zip(b.names, b.shapes, b.offsets, strict=True)]
            hit = _OPENED[key] = (flat, views)
        out.extend(hit[1])
    return out


def forget_ipc() -> None:
    """Close every opened bucket and drop the plans: the trainer can then free its buckets (a mapping held here
    keeps their memory allocated in the trainer's process). The next sync opens the buckets it sends."""
    _OPENED.clear()
    _PLANS.clear()


def engine_copy_plan(buckets: list[IpcBucket], flat_index: dict, params: dict) -> list[tuple[Any, Any]]:
    """`copy_plan` for buckets received over HTTP: handles opened and plans built once per bucket."""
    open_buckets(buckets)
    out = []
    for b in buckets:
        key = _key(b)
        if key not in _PLANS:
            _PLANS[key] = copy_plan([b], [_OPENED[key][0]], flat_index, params)
        out += _PLANS[key]
    return out


_PINNED: dict[str, tuple[Any, list]] = {}  # engine side: path -> (pinned host tensor, copy plan)


def engine_copy_plan_pinned(req: UpdateWeightsFromPinnedRequest, flat_index: dict, params: dict) -> list:
    """Engine side: [(destination, pinned source)] copies for `req` (file mapped and plan built once per file)."""
    real = os.path.realpath(req.path)
    if not real.startswith(PREFIX) or "/" in real[len(PREFIX):]:
        raise ValueError(f"refusing to map {req.path!r}: not a streamrl weights file ({PREFIX}*)")
    hit = _PINNED.get(real)
    if hit is None:
        if os.path.getsize(real) != req.nbytes:
            raise ValueError(f"{real}: {os.path.getsize(real)} bytes, the request says {req.nbytes}")
        host = map_file(real, req.nbytes, create=False)
        plan = copy_plan(req.buckets, bucket_views(host, req.buckets, req.byte_offsets), flat_index, params)
        hit = _PINNED[real] = (host, plan)
    return hit[1]
