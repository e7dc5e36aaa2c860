"""The engine's parameters in one flat buffer per dtype, laid out as the trainer packs its weight-sync buckets.

A CUDA IPC sync (streamrl/sync/cuda_ipc.py) then needs one contiguous device copy per bucket instead of one slice
per parameter: the trainer packs named_parameters() in order, each tensor at an offset rounded up to
`ALIGN_BYTES`, and the engine's flat buffer uses the same rule, so a bucket maps onto one range of it. Flattening
happens once at load, before any CUDA graph is captured (graphs keep the parameters' addresses).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from streamrl.weights.layout import ALIGN_BYTES, aligned

__all__ = ["ALIGN_BYTES", "FlatSlot", "aligned", "flatten_parameters"]

class FlatSlot(NamedTuple):
    flat: torch.Tensor  # the dtype's flat buffer
    offset: int  # elements
    numel: int


def flatten_parameters(model: torch.nn.Module) -> dict[str, FlatSlot]:
    """Move every parameter into a flat per-dtype buffer (in named_parameters() order, aligned offsets); the
    Parameter objects stay (tied weights stay tied), only their storage moves. Returns {name: FlatSlot}."""
    named = list(model.named_parameters())
    offsets: dict[str, int] = {}
    sizes: dict[torch.dtype, int] = {}
    for name, p in named:
        off = aligned(sizes.get(p.dtype, 0), p.element_size())
        offsets[name] = off
        sizes[p.dtype] = off + p.numel()
    device = named[0][1].device if named else torch.device("cpu")
    flats = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}
    index = {}
    with torch.no_grad():
        for name, p in named:
            flat, off = flats[p.dtype], offsets[name]
            view = flat[off : off + p.numel()].view(p.shape)
            view.copy_(p.data)
            p.data = view
            index[name] = FlatSlot(flat, off, p.numel())
    return index
