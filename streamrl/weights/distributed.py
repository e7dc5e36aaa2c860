"""SGLang's distributed weight update: the request bodies and the weight-update process group both sides join.

The trainer is rank 0 of a group of its own; engine i's TP rank r is `rank_offset_i + r` (SGLang's model runner),
with `rank_offset_i = 1 + i * tp_size` and `world_size = 1 + engines * tp_size`. Per bucket the trainer POSTs
`/update_weights_from_distributed` (names, dtypes, shapes) to every engine and broadcasts each tensor from rank 0
meanwhile; the engines receive into empty tensors of those dtypes and shapes, in that order, and load them.

Why `_new_process_group_helper` (private): the group must live beside the trainer's default group (FSDP) and in an
engine that has none, and its store keys must be SGLang's, so that this trainer also drives real SGLang engines.
SGLang, slime, verl and OpenRLHF all build it this way (`init_custom_process_group`): a TCP store rendezvous,
`PrefixStore(group_name)`, then the helper with no global ranks (a group of its own, not a subgroup of the
default one). Its signature is the same in torch 2.11 and 2.13 for the arguments passed here.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

GROUP_NAME = "weight_update_group"  # SGLang's default
TIMEOUT = datetime.timedelta(minutes=10)  # a rendezvous or a bucket's broadcasts that take longer failed


class InitWeightsUpdateGroupRequest(msgspec.Struct, kw_only=True):
    """POST /init_weights_update_group (SGLang's InitWeightsUpdateGroupReqInput)."""

    master_address: str
    master_port: int  # the trainer's TCP store (rank 0 listens)
    rank_offset: int  # this engine's first rank; >= 1 (rank 0 is the trainer)
    world_size: int  # 1 + every engine's TP ranks
    group_name: str = GROUP_NAME
    backend: str = "nccl"  # gloo on CPU


class UpdateWeightsFromDistributedRequest(msgspec.Struct, kw_only=True):
    """POST /update_weights_from_distributed: one bucket. names, dtypes and shapes have one entry per tensor, in the
    order rank 0 broadcasts them."""

    names: list[str]
    dtypes: list[str]  # wire names ("bfloat16"), as SGLang's getattr(torch, dtype) reads them
    shapes: list[list[int]]
    group_name: str = GROUP_NAME
    flush_cache: bool = True
    weight_version: str | None = None  # set on the last bucket only: the version moves once all weights are in
    load_format: str | None = None


class DestroyWeightsUpdateGroupRequest(msgspec.Struct, kw_only=True):
    group_name: str = GROUP_NAME


def check_init(req: InitWeightsUpdateGroupRequest, tp_size: int = 1) -> None:
    """ValueError naming the field when the ranks of `req` cannot form a group."""
    if req.backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {req.backend!r}: use nccl (GPU) or gloo (CPU)")
    if req.rank_offset < 1:
        raise ValueError(f"rank_offset {req.rank_offset}: rank 0 is the trainer, engines start at 1")
    if req.world_size < req.rank_offset + tp_size:
        raise ValueError(f"world_size {req.world_size} is too small for rank_offset {req.rank_offset} with "
                         f"{tp_size} rank(s) per engine (world_size = 1 + every engine's TP ranks)")
    if not req.group_name:
        raise ValueError("group_name must not be empty")


def new_group(backend: str, world_size: int, rank: int, group_name: str, *, address: str = "",
              port: int = 0, store: Any = None) -> Any:
    """Join (or, with `store`, host) the weight-update group; blocks until every rank has joined (gloo) or, for
    NCCL, until the store rendezvous is done (the communicator comes up at the first broadcast)."""
    if store is None:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=TIMEOUT)
    store = dist.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], dist.Backend(backend), store,
                                           group_name=group_name, timeout=TIMEOUT)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # destroy_process_group reads it
    return pg


def host_store(address: str, world_size: int) -> Any:
    """Rank 0's TCP store on a free port (`.port`), bound before the engines are told about it: no port race."""
    return dist.TCPStore(address, 0, world_size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)


def broadcast(pg: Any, tensors: list[torch.Tensor]) -> None:
    """Broadcast each tensor from rank 0 (queued asynchronously, then awaited), in order: the receive side calls
    this with empty tensors of the same dtypes and shapes."""
    works = [pg.broadcast(t, 0) for t in tensors]
    for w in works:
        w.wait()


def destroy(pg: Any) -> None:
    dist.destroy_process_group(pg)
