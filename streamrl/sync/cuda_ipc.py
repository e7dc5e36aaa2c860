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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
        import torch

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
    import torch

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


def bucket_layout(tensors: list, bucket_bytes: int) -> list[tuple[Any, list[int], list[int], int]]:
    """Split [(tensor, target dtype)] into per-dtype buckets of at most `bucket_bytes` (a bigger tensor gets its
    own): [(dtype, tensor indices, offsets, numel)], offsets aligned as the engine's flat weights (flat.py)."""
    from streamrl.rollout.engine.flat import aligned

    open_: dict[Any, tuple[list[int], list[int], int]] = {}  # dtype -> the bucket being filled
    out = []
    for i, (t, dt) in enumerate(tensors):
        idx, offs, end = open_.get(dt, ([], [], 0))
        off = aligned(end, dt.itemsize)
        if idx and (off + t.numel()) * dt.itemsize > bucket_bytes:
            out.append((dt, idx, offs, end))
            idx, offs, off = [], [], 0
        open_[dt] = (idx + [i], offs + [off], off + t.numel())
    out.extend((dt, idx, offs, end) for dt, (idx, offs, end) in open_.items())
    return out


_OPENED: dict[bytes, tuple[Any, list[tuple[str, Any]]]] = {}  # engine side: handle -> (flat, views), opened once
_PLANS: dict[bytes, list[tuple[Any, Any]]] = {}  # engine side: bucket -> [(destination, source)] copies


def _key(b: IpcBucket) -> bytes:
    h = b.handle
    return bytes(h[1]) + h[3].to_bytes(8, "little") + repr((b.dtype, b.numel, b.names, b.offsets)).encode()


def open_buckets(buckets: list[IpcBucket]) -> list[tuple[str, Any]]:
    """Engine side: views into the trainer's buckets, [(name, tensor)] (handles opened once per bucket)."""
    import torch

    out = []
    for b in buckets:
        key = _key(b)
        hit = _OPENED.get(key)
        if hit is None:
            h = b.handle
            storage = torch.UntypedStorage._new_shared_cuda(h[0], bytes(h[1]), h[2], h[3], bytes(h[4]), h[5],
                                                            bytes(h[6]) if h[6] else h[6], h[7])
            flat = torch.empty(0, dtype=getattr(torch, b.dtype), device=f"cuda:{h[0]}").set_(storage, 0, (b.numel,))
            views = [(name, flat[off : off + _numel(shape)].view(shape))
                     for name, shape, off in zip(b.names, b.shapes, b.offsets, strict=True)]
            hit = _OPENED[key] = (flat, views)
        out.extend(hit[1])
    return out


def copy_plan(buckets: list[IpcBucket], flats: list[Any], flat_index: dict, params: dict) -> list[tuple[Any, Any]]:
    """Engine side: [(destination, source)] device copies that load `buckets` (mapped as `flats`) into the model.

    A bucket whose tensors sit in the engine's flat weights (`flat_index`, flat.py) at the same relative offsets
    becomes ONE contiguous copy; any other bucket is copied tensor by tensor into `params` (state-dict views).
    Names, shapes and dtypes are checked first: ValueError, nothing written.
    """
    pairs = []
    for b, flat in zip(buckets, flats, strict=True):
        for name, shape in zip(b.names, b.shapes, strict=True):
            if name not in params:
                raise ValueError(f"unknown parameter name {name!r}")
            if tuple(shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(shape)} != model shape {tuple(params[name].shape)}")
        first = flat_index.get(b.names[0]) if b.names else None
        one_range = first is not None and str(first.flat.dtype).replace("torch.", "") == b.dtype and all(
            (s := flat_index.get(n)) is not None and s.flat is first.flat and s.offset - first.offset == off
            for n, off in zip(b.names, b.offsets, strict=True))
        if one_range:
            end = b.offsets[-1] + _numel(b.shapes[-1])
            pairs.append((first.flat[first.offset : first.offset + end], flat[:end]))
        else:
            pairs += [(params[n], flat[off : off + _numel(shape)].view(shape))
                      for n, shape, off in zip(b.names, b.shapes, b.offsets, strict=True)]
    return pairs


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


_SENDER = IpcSender()


def stage_ipc(named: list, version: int, bucket_bytes: int, dtype: Any = None) -> Callable[[list[str]], dict]:
    """Trainer side, phase 1 (engines may still be generating): queue the packing copies into the shared buckets.
    Returns phase 2, `push(engine_urls)`: wait for the copies, post the handles, and wait for every engine to
    confirm `version`. `dtype`: the engines' weight dtype (floating tensors are cast while packing)."""
    t0 = time.time()
    buckets = _SENDER.fill(named, bucket_bytes, dtype)  # asynchronous on the device: overlaps the pause request

    def push(engine_urls: list[str]) -> dict[str, float]:
        import torch

        from streamrl.sync.base import post_update

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
