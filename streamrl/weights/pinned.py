"""The pinned-memory transport's wire format: one /dev/shm file that the trainer fills and every engine maps."""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from streamrl.weights.layout import IpcBucket

PREFIX = "/dev/shm/streamrl-weights-"


class UpdateWeightsFromPinnedRequest(msgspec.Struct, kw_only=True):
    path: str  # PREFIX...
    nbytes: int
    buckets: list[IpcBucket]  # `handle` unused
    byte_offsets: list[int]  # where each bucket starts in the file
    weight_version: str | None = None


def map_file(path: str, nbytes: int, create: bool) -> Any:
    """The file as a pinned uint8 tensor (MAP_SHARED)."""

    if create:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    t = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    if torch.cuda.is_available():
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {path} ({nbytes} bytes) failed: {err}")
    return t


def bucket_views(host: Any, buckets: list[IpcBucket], byte_offsets: list[int]) -> list[Any]:

    out = []
    for b, start in zip(buckets, byte_offsets, strict=True):
        dt = getattr(torch, b.dtype)
        out.append(host[start : start + b.numel * dt.itemsize].view(dt))
    return out
