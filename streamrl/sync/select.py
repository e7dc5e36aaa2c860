"""Pick and run the weight transport for `--update-weight-transport` (auto: CUDA IPC on GPU, HTTP tensors on CPU)."""

from __future__ import annotations

import argparse
import tempfile
import time


def resolve(args: argparse.Namespace, on_cuda: bool) -> str:
    t = args.update_weight_transport
    if t == "auto":
        return "ipc" if on_cuda else "http"
    if t == "ipc" and not on_cuda:
        raise ValueError("--update-weight-transport ipc needs the trainer on a GPU")
    return t


def push(args: argparse.Namespace, transport: str, engine_urls: list[str], named: list, version: int) -> dict:
    if transport == "ipc":
        from streamrl.sync.cuda_ipc import push_ipc

        return push_ipc(engine_urls, named, version, args.update_weight_buffer_size)
    if transport == "http":
        from streamrl.sync.http_tensor import push_named_tensors

        return push_named_tensors(engine_urls, named, version, args.update_weight_buffer_size)
    if transport == "disk":
        return push_disk(engine_urls, named, version, args.hf_checkpoint)
    raise ValueError(f"unknown weight transport {transport!r}")


def push_disk(engine_urls: list[str], named: list, version: int, hf_checkpoint: str) -> dict:
    """Fallback: an HF directory (the checkpoint's config + new safetensors), then `/update_weights_from_disk`."""
    import os
    import shutil

    from safetensors.torch import save_file

    from streamrl.sync.base import post_json

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        for f in ("config.json", "generation_config.json"):
            if os.path.exists(os.path.join(hf_checkpoint, f)):
                shutil.copy(os.path.join(hf_checkpoint, f), d)
        save_file({n: t.contiguous() for n, t in named}, os.path.join(d, "model.safetensors"))
        for url in engine_urls:
            post_json(url, "/update_weights_from_disk", {"model_path": d, "weight_version": str(version)})
    return {"sync_start": t0, "sync_push_time": time.time() - t0}
