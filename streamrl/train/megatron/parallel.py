"""Process groups for the Megatron ranks: torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's own, and the
one differentiable all-gather that the model uses over them."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor


def init_model_parallel(args: argparse.Namespace, seed: int) -> None:
    """Megatron's groups over the default one (already initialised); its CUDA RNG tracker on GPU
    (`model_parallel_cuda_manual_seed` needs CUDA); on CPU a tracker whose `fork()` does nothing (Megatron's
    inference tracker: the sequence-parallel embedding forks it, and nothing here draws from it: no dropout,
    weights loaded)."""
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                             context_parallel_size=args.context_parallel_size)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


@contextmanager
def single_process_world(store_path: str, tp: int = 1) -> Iterator[None]:
    """A gloo world of one process with Megatron's groups (tests, CPU tools); torn down on exit."""
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tp, 1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Any, sum_grad: bool) -> Tensor:
        ctx.dim, ctx.group, ctx.sum_grad = dim, group, sum_grad
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.sum_grad:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.width, ctx.width).contiguous(), None, None, None


def gather_along(x: Tensor, dim: int, group: Any, sum_grad: bool = False) -> Tensor:
    """All-gather `x` along `dim` over `group`, in rank order (Megatron's own gathers allocate on the current CUDA
    device; this one runs on CPU too). Backward keeps this rank's slice of the gradient: as it is when every rank
    holds the whole gradient (one loss computed on every rank: the logits), summed over the group first when each
    rank's is a part (`sum_grad`: K and V under context parallelism, used by every rank's queries)."""
    return _GatherAlong.apply(x, dim, group, sum_grad)
