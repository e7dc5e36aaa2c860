"""Process groups for the Megatron ranks: torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's own."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


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
