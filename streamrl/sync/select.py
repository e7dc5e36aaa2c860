"""Pick and run the weight transport for `--update-weight-transport` (auto: CUDA IPC on a shared GPU, NCCL broadcasts
between GPUs, HTTP tensors on CPU)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from streamrl.sync.base import post_json
from streamrl.sync.cuda_ipc import stage_ipc
from streamrl.sync.distributed import stage_distributed
from streamrl.sync.http_tensor import stage_named_tensors
from streamrl.sync.pinned import stage_pinned


def resolve(args: argparse.Namespace, on_cuda: bool, shares_gpu: bool = True) -> str:
    """auto: CUDA IPC when the trainer shares its GPU with the engines, host-pinned buckets when they are on other
    GPUs (docs/benchmarks.md), msgpack over HTTP on CPU. `distributed` (NCCL, SGLang's contract) is asked for
    by name until it has been measured on several GPUs; on CPU it runs the same broadcasts over gloo."""
    t = args.update_weight_transport
    if t == "auto":
        return ("ipc" if shares_gpu else "pinned") if on_cuda else "http"
    if t == "ipc" and not on_cuda:
        raise ValueError("--update-weight-transport ipc needs the trainer on a GPU")
    return t


def engine_dtype(args: argparse.Namespace) -> torch.dtype:
    """The embedded engine's weight dtype: what the transports that copy raw buckets send."""
    return getattr(torch, args.engine_dtype or ("bfloat16" if torch.cuda.is_available() else "float32"))


def stage(args: argparse.Namespace, transport: str, named: list, version: int) -> Callable[[list[str]], dict]:
    """Phase 1 of a sync, run while the engines still generate; returns phase 2, `push(engine_urls)` (run while
    they are paused). ipc: queue the packing copies; http: serialize the buckets; distributed: cast the buckets;
    disk: write the safetensors."""
    if transport == "ipc":
        dtype = getattr(torch, args.engine_dtype or "bfloat16")  # the embedded engine's weights on GPU
        return stage_ipc(named, version, args.update_weight_buffer_size, dtype)
    if transport == "pinned":
        return stage_pinned(named, version, args.update_weight_buffer_size, engine_dtype(args))
    if transport == "distributed":  # an SGLang engine's ranks: one per GPU it spans
        tp = args.rollout_num_gpus_per_engine if args.rollout_engine == "sglang" else 1
        return stage_distributed(named, version, args.update_weight_buffer_size, engine_dtype(args), tp)
    if transport == "http":

        return stage_named_tensors(named, version, args.update_weight_buffer_size)
    if transport == "disk":
        return stage_disk(named, version, args.hf_checkpoint)
    raise ValueError(f"unknown weight transport {transport!r}")


def push(args: argparse.Namespace, transport: str, engine_urls: list[str], named: list, version: int) -> dict:
    """Both phases at once."""
    return stage(args, transport, named, version)(engine_urls)


def stage_disk(named: list, version: int, hf_checkpoint: str) -> Callable[[list[str]], dict]:
    """Fallback: an HF directory (the checkpoint's config + new safetensors), then `/update_weights_from_disk`."""

    t0 = time.time()
    d = tempfile.mkdtemp(prefix="streamrl-weights-")
    for f in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(hf_checkpoint, f)):
            shutil.copy(os.path.join(hf_checkpoint, f), d)
    save_file({n: t.contiguous() for n, t in named}, os.path.join(d, "model.safetensors"))

    def push(engine_urls: list[str]) -> dict:
        t1 = time.time()
        try:
            for url in engine_urls:
                post_json(url, "/update_weights_from_disk", {"model_path": d, "weight_version": str(version)})
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return {"sync_start": t0, "sync_push_time": time.time() - t1}

    return push
