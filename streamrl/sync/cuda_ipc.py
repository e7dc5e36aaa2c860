"""Transport: CUDA IPC on one GPU (trainer and engine as separate processes on the same card).

The trainer flattens parameters into per-dtype buckets (`--update-weight-buffer-size` bytes each), exports each
bucket's CUDA memory handle, and posts the handles with the names/shapes/offsets to the engine's
`/update_weights_from_ipc`; the engine maps the bucket and copies slices into its parameters on the device (no host
round trip, no pickle: the handle fields are plain bytes and ints in msgpack). The trainer keeps each bucket alive
until the engine has answered.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec


class IpcBucket(msgspec.Struct, kw_only=True):
    """One flat CUDA buffer shared by handle; tensor i is `flat[offsets[i]: offsets[i] + numel(shapes[i])]`."""

    handle: list[Any]  # torch.UntypedStorage._share_cuda_() fields: bytes / ints / bool
    dtype: str  # "bfloat16", "float32", ...
    numel: int
    names: list[str]
    shapes: list[list[int]]
    offsets: list[int]


class UpdateWeightsFromIpcRequest(msgspec.Struct, kw_only=True):
    buckets: list[IpcBucket]
    weight_version: str | None = None


class IpcSender:
    """Trainer side: flat per-dtype buckets allocated and exported once, refilled on every sync.

    Exporting a handle and (on the engine) opening it cost milliseconds each, so both happen once per bucket for
    the life of the job; a sync is then one fused copy into the buckets here and one on the engine.
    """

    def __init__(self) -> None:
        self.layout: list[tuple[str, Any, tuple[int, ...]]] | None = None
        self.flats: list[Any] = []
        self.buckets: list[IpcBucket] = []

    def fill(self, named: list, bucket_bytes: int) -> list[IpcBucket]:
        import torch

        layout = [(n, t.dtype, tuple(t.shape)) for n, t in named]
        if layout != self.layout:
            self.flats, self.buckets = _allocate(named, bucket_bytes)
            self.layout = layout
        src = {n: t for n, t in named}
        dst, srcs = [], []
        for flat, b in zip(self.flats, self.buckets, strict=True):
            for name, shape, off in zip(b.names, b.shapes, b.offsets, strict=True):
                n = 1
                for d in shape:
                    n *= d
                dst.append(flat[off : off + n])
                srcs.append(src[name].reshape(-1))
        torch._foreach_copy_(dst, srcs)  # a few multi-tensor kernels instead of one copy per parameter
        return self.buckets


def _allocate(named: list, bucket_bytes: int) -> tuple[list[Any], list[IpcBucket]]:
    import torch

    groups: dict[Any, list[list]] = {}
    for name, t in named:
        lst = groups.setdefault(t.dtype, [[]])
        size = sum(x.numel() for _, x in lst[-1]) * t.element_size()
        if lst[-1] and size + t.numel() * t.element_size() > bucket_bytes:
            lst.append([])
        lst[-1].append((name, t))
    flats, buckets = [], []
    for dtype, parts in groups.items():
        for part in parts:
            numel = sum(t.numel() for _, t in part)
            flat = torch.empty(numel, dtype=dtype, device=part[0][1].device)
            offsets, off = [], 0
            for _, t in part:
                offsets.append(off)
                off += t.numel()
            flats.append(flat)
            buckets.append(IpcBucket(handle=list(flat.untyped_storage()._share_cuda_()),
                                     dtype=str(dtype).replace("torch.", ""), numel=numel,
                                     names=[n for n, _ in part], shapes=[list(t.shape) for _, t in part],
                                     offsets=offsets))
    return flats, buckets


_OPENED: dict[bytes, Any] = {}  # engine side: handle -> mapped flat tensor, opened once per bucket


def open_buckets(buckets: list[IpcBucket]) -> list[tuple[str, Any]]:
    """Engine side: views into the trainer's buckets, [(name, tensor)]."""
    import torch

    out = []
    for b in buckets:
        h = b.handle
        key = bytes(h[1]) + h[3].to_bytes(8, "little")
        flat = _OPENED.get(key)
        if flat is None:
            storage = torch.UntypedStorage._new_shared_cuda(h[0], bytes(h[1]), h[2], h[3], bytes(h[4]), h[5],
                                                            bytes(h[6]) if h[6] else h[6], h[7])
            dtype = getattr(torch, b.dtype)
            flat = torch.empty(0, dtype=dtype, device=f"cuda:{h[0]}").set_(storage, 0, (b.numel,))
            _OPENED[key] = flat
        for name, shape, off in zip(b.names, b.shapes, b.offsets, strict=True):
            n = 1
            for d in shape:
                n *= d
            out.append((name, flat[off : off + n].view(shape)))
    return out


_SENDER = IpcSender()


def push_ipc(engine_urls: list[str], named: list, version: int, bucket_bytes: int) -> dict[str, float]:
    """Trainer side: share buckets with every engine on this GPU and wait for each to confirm `version`."""
    import torch

    from streamrl.sync.base import http_client

    t0 = time.time()
    buckets = _SENDER.fill(named, bucket_bytes)
    torch.cuda.synchronize()  # the engine reads the buckets from another process: they must be written
    body = msgspec.msgpack.encode(UpdateWeightsFromIpcRequest(buckets=buckets, weight_version=str(version)))
    for url in engine_urls:
        r = http_client().post(url + "/update_weights_from_ipc", content=body,
                               headers={"content-type": "application/msgpack"})
        if r.status_code != 200 or not r.json().get("success", False):
            raise RuntimeError(f"engine {url}: IPC weight update to version {version} failed: {r.text[:300]}")
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    return {"sync_start": t0, "sync_push_time": time.time() - t0, "sync_bytes": float(nbytes),
            "sync_buckets": float(len(buckets))}
