"""Transport: named tensors over the engines' `/update_weights_from_tensor` HTTP endpoint (msgpack, no pickle).

Buckets of at most `--update-weight-buffer-size` bytes; only the last bucket carries `weight_version`, so an engine
reports the new version only once it holds all of the new weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from streamrl.sync.base import http_client
from streamrl.weights.tensor import encode_update_request


def buckets(named: list, limit_bytes: int) -> list[list]:
    out, cur, size = [], [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > limit_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += nbytes
    if cur:
        out.append(cur)
    return out


def stage_named_tensors(named: list, version: int, bucket_bytes: int) -> Callable[[list[str]], dict]:
    """Serialize the buckets now (engines may still generate); returns `push(engine_urls)` that posts them."""

    t0 = time.time()
    parts = buckets(named, bucket_bytes)
    bodies = [encode_update_request(p, weight_version=str(version) if i == len(parts) - 1 else None)
              for i, p in enumerate(parts)]
    return lambda engine_urls: _post(engine_urls, bodies, version, t0)


def push_named_tensors(engine_urls: list[str], named: list, version: int, bucket_bytes: int) -> dict[str, float]:
    return stage_named_tensors(named, version, bucket_bytes)(engine_urls)


def _post(engine_urls: list[str], bodies: list[bytes], version: int, t0: float) -> dict[str, float]:

    t1 = time.time()
    sent = 0
    client = http_client()
    for url in engine_urls:
        for body in bodies:
            r = client.post(url + "/update_weights_from_tensor", content=body,
                            headers={"content-type": "application/msgpack"})
            if r.status_code != 200 or not r.json().get("success", False):
                raise RuntimeError(f"engine {url}: weight update to version {version} failed: {r.text[:300]}")
            sent += len(body)
        got = client.get(url + "/get_weight_version").json()["weight_version"]
        if got != str(version):
            raise RuntimeError(f"engine {url} reports weight_version {got!r} after update to {version}")
    return {"sync_start": t0, "sync_push_time": time.time() - t1, "sync_bytes": float(sent),
            "sync_buckets": float(len(bodies))}
