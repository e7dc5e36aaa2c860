"""Context parallelism for the Megatron rank (`--context-parallel-size C`): each rank of a CP group holds 2 of the
2C equal chunks of every (padded) sequence, chunks r and 2C-1-r, Megatron's load-balanced layout (its rotary
embedding slices the positions the same way). Attention all-gathers K and V over the group (queries stay local)
with a causal mask on the tokens' global positions; the logits (or, for the chunked LM head, the final hidden
states) are all-gathered at the end, so the one shared step sees whole sequences on every CP rank. Backward: each
gather keeps its own slice of the (CP-summed, for K and V) gradient, and the weights' gradients are summed over the
group before the optimizer step (rank.py); the chunked head, which every CP rank runs on whole sequences, scales its
weight's gradient by 1/C first (`scale_grad`). Padded rows only: a packed micro-batch (--qkv-format thd) runs
padded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from streamrl.train.megatron.parallel import gather_along


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def _chunks(size: int, rank: int) -> tuple[int, int]:
    """The two chunk indices of `rank` among 2*size."""
    return rank, 2 * size - 1 - rank


def local_positions(n: int, device: torch.device, rank: int | None = None) -> Tensor:
    """Global positions (0..n-1) of a rank's tokens, in the order it holds them; `n` divides by 2C."""
    size = cp_size()
    rank = parallel_state.get_context_parallel_rank() if rank is None else rank
    step = n // (2 * size)
    return torch.cat([torch.arange(c * step, (c + 1) * step, device=device) for c in _chunks(size, rank)])


def split(x: Tensor, dim: int) -> Tensor:
    """This rank's part of a whole sequence along `dim`."""
    return x.index_select(dim, local_positions(x.shape[dim], x.device))


def gather_kv(x: Tensor, dim: int) -> Tensor:
    """K or V of every CP rank (rank order), the gradient summed over the queries of all ranks."""
    return gather_along(x, dim, parallel_state.get_context_parallel_group(), sum_grad=True)


def gathered_positions(n_local: int, device: torch.device) -> Tensor:
    """Global positions of the tokens that `gather_kv` returns, in its order."""
    n = n_local * cp_size()
    return torch.cat([local_positions(n, device, r) for r in range(cp_size())])


def gather_sequence(x: Tensor, dim: int) -> Tensor:
    """Whole sequences back from every rank's parts (the logits), in their global order."""
    whole = gather_along(x, dim, parallel_state.get_context_parallel_group())
    order = torch.argsort(gathered_positions(x.shape[dim], x.device))
    return whole.index_select(dim, order)


def causal_mask(n_local: int, device: torch.device) -> Tensor:
    """[local queries, gathered keys] True where the query may attend (key position <= query position)."""
    q = local_positions(n_local * cp_size(), device)
    return q[:, None] >= gathered_positions(n_local, device)[None, :]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """`x` unchanged; its gradient times `factor`."""
    return _ScaleGrad.apply(x, factor)


def sum_grads(params: list[torch.nn.Parameter]) -> None:
    """Each CP rank's gradient is its tokens' part: the whole is their sum."""
    group = parallel_state.get_context_parallel_group()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
