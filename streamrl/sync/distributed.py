"""Transport: broadcasts in a process group of the trainer and the engines (NCCL on GPUs, gloo on CPU), driven by
SGLang's `/init_weights_update_group` and `/update_weights_from_distributed`, so the same code syncs real SGLang
engines and the embedded one (the contract: streamrl/weights/distributed.py).

The first push forms the group: every engine is told its rank offset while the trainer (rank 0) hosts the store;
a later push to a different set of engines (one died, a replacement joined) forms it again. Each push sends
`--update-weight-buffer-size` buckets: one POST per engine per bucket, answered once the engine has received and
loaded it, while the trainer broadcasts the bucket's tensors. Only the last bucket carries the version. A failed
bucket leaves the group to be formed again at the next push (a broadcast an engine never joined times out after
`weights.distributed.TIMEOUT`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import torch

from streamrl.sync.base import post_json
from streamrl.sync.http_tensor import buckets
from streamrl.weights.distributed import GROUP_NAME, broadcast, destroy, host_store, new_group
from streamrl.weights.tensor import dtype_name


def reachable_address(url: str) -> str:
    """This host's address as seen from the engine at `url` (the interface that routes to it)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP: no packet is sent, the kernel only picks the route
        return s.getsockname()[0]


class DistributedSender:
    """Rank 0 of the weight-update group, and the engines it was formed with."""

    def __init__(self) -> None:
        self.pg: Any = None
        self.urls: list[str] = []
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="streamrl-sync-dist")

    def connect(self, engine_urls: list[str], backend: str, tp_size: int) -> float:
        """Form the group with `engine_urls` unless it exists with them; returns the seconds spent."""
        if self.pg is not None and self.urls == engine_urls:
            return 0.0
        t0 = time.time()
        self.close(engine_urls)
        world = 1 + len(engine_urls) * tp_size
        address = reachable_address(engine_urls[0])
        store = host_store(address, world)
        calls = [self.pool.submit(post_json, url, "/init_weights_update_group", {
            "master_address": address, "master_port": store.port, "rank_offset": 1 + i * tp_size,
            "world_size": world, "group_name": GROUP_NAME, "backend": backend}, 600.0)
            for i, url in enumerate(engine_urls)]
        # rank 0 joins in a thread: an engine that refuses (400) fails the sync now, not at the rendezvous timeout
        joined = self.pool.submit(new_group, backend, world, 0, GROUP_NAME, store=store)
        for url, call in zip(engine_urls, calls, strict=True):
            _check(url, call.result(), "/init_weights_update_group")
        self.pg, self.urls = joined.result(), list(engine_urls)
        return time.time() - t0

    def close(self, live_urls: list[str]) -> None:
        """Leave the group; the engines still alive leave it too (best effort: one may be gone)."""
        if self.pg is None:
            return
        for url in [u for u in self.urls if u in live_urls]:
            try:
                post_json(url, "/destroy_weights_update_group", {"group_name": GROUP_NAME})
            except (ConnectionError, RuntimeError):
                pass  # its group goes with it; a live engine that kept it refuses the next init by name
        destroy(self.pg)
        self.pg, self.urls = None, []

    def send(self, engine_urls: list[str], parts: list[list], version: int) -> float:
        """Every bucket to every engine; returns the slowest engine's receive-and-load seconds (summed)."""
        copy_s = 0.0
        try:
            for i, part in enumerate(parts):
                body = {"names": [n for n, _ in part], "dtypes": [dtype_name(t.dtype) for _, t in part],
                        "shapes": [list(t.shape) for _, t in part], "group_name": GROUP_NAME, "flush_cache": True,
                        "weight_version": str(version) if i == len(parts) - 1 else None}
                calls = [self.pool.submit(post_json, url, "/update_weights_from_distributed", body, 600.0)
                         for url in engine_urls]
                broadcast(self.pg, [t for _, t in part])
                outs = [_check(url, call.result(), f"weight update to version {version}")
                        for url, call in zip(engine_urls, calls, strict=True)]
                copy_s += max(float(o.get("copy_time", 0.0)) for o in outs)
        except BaseException:
            self.close(engine_urls)  # formed again at the next push
            raise
        return copy_s


def _check(url: str, out: dict, what: str) -> dict:
    if not out.get("success", False):
        raise RuntimeError(f"engine {url}: {what} failed: {out.get('message')}")
    return out


_SENDER = DistributedSender()


def stage_distributed(named: list, version: int, bucket_bytes: int, dtype: Any = None,
                      tp_size: int = 1) -> Callable[[list[str]], dict]:
    """Phase 1 (engines may still generate): cast the weights to the engines' dtype, contiguous, in buckets.
    Returns phase 2, `push(engine_urls)`: form the group if needed, then broadcast every bucket."""
    t0 = time.time()
    cast = [(n, (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()) for n, t in named]
    parts = buckets(cast, bucket_bytes)
    nbytes = sum(t.numel() * t.element_size() for _, t in cast)

    def push(engine_urls: list[str]) -> dict[str, float]:
        backend = "nccl" if cast[0][1].is_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.synchronize()  # the casts above run on the default stream, NCCL on its own
        connect_s = _SENDER.connect(engine_urls, backend, tp_size)
        t1 = time.time()
        copy_s = _SENDER.send(engine_urls, parts, version)
        return {"sync_start": t0, "sync_connect_time": connect_s, "sync_push_time": time.time() - t1,
                "sync_engine_copy_time": copy_s, "sync_bytes": float(nbytes), "sync_buckets": float(len(parts))}

    return push
