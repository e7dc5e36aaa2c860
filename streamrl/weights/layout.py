"""Bucket layout of a weight sync, shared by the trainer (which packs) and the engine (which copies out).

The trainer packs parameters in order into per-dtype flat buckets, each tensor at an offset rounded up to
`ALIGN_BYTES`; the engine's flat weights (engine/flat.py) use the same rule, so a bucket maps onto one
range of them and loads in one device copy (`copy_plan`). The bucket descriptions travel as msgpack.
"""

from __future__ import annotations

from typing import Any

import msgspec

ALIGN_BYTES = 256  # keeps every tensor's address 256-byte aligned, as the caching allocator would


def aligned(offset: int, itemsize: int) -> int:
    """`offset` (elements) rounded up so that offset * itemsize is a multiple of ALIGN_BYTES."""
    step = max(1, ALIGN_BYTES // itemsize)
    return -(-offset // step) * step


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


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bucket_layout(tensors: list, bucket_bytes: int) -> list[tuple[Any, list[int], list[int], int]]:
    """Split [(tensor, target dtype)] into per-dtype buckets of at most `bucket_bytes` (a bigger tensor gets its
    own): [(dtype, tensor indices, offsets, numel)], offsets `aligned` as the engine's flat weights."""
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
            end = b.offsets[-1] + numel(b.shapes[-1])
            pairs.append((first.flat[first.offset : first.offset + end], flat[:end]))
        else:
            pairs += [(params[n], flat[off : off + numel(shape)].view(shape))
                      for n, shape, off in zip(b.names, b.shapes, b.offsets, strict=True)]
    return pairs
