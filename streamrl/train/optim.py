"""The policy's optimizer from the flags (`--optimizer`, `--lr`, `--weight-decay`, Adam's betas, SGD's momentum),
whole or with its state sharded over the data-parallel ranks (`--use-distributed-optimizer`, ZeRO stage 1:
torch's `ZeroRedundancyOptimizer`), and the local view that code touching the state (checkpoints, offload,
`--reset-optimizer-states`) works on."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer


def build_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter],
                    shard_group: Any = None) -> torch.optim.Optimizer:
    """AdamW (or SGD); with `shard_group`, each rank of it keeps the state of its share of `params` only (whole
    tensors, assigned by size) and the owners broadcast the updated parameters after every step."""
    if args.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": args.sgd_momentum, "weight_decay": args.weight_decay}
    else:
        cls, kw = torch.optim.AdamW, {"weight_decay": args.weight_decay, "betas": (args.adam_beta1, args.adam_beta2)}
    if shard_group is None:
        return cls(params, lr=args.lr, **kw)
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=shard_group, lr=args.lr, **kw)


def local_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: a sharded one's local optimizer (over its share of the
    parameters), else `opt` itself."""
    return opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt


def is_sharded(opt: torch.optim.Optimizer | None) -> bool:
    return isinstance(opt, ZeroRedundancyOptimizer)
