"""The weight-sync sequence shared by every transport (DESIGN.md "Weight sync and partial rollouts").

    0. stage the new weights (optional, while the engines still generate)
    1. pause every engine (`/pause_generation`, abort mode: in-flight requests return their prefixes, which the
       producers resubmit as partial rollouts; requests arriving during the pause wait)
    2. the trainer pushes its weights with the new version (transport-specific; each engine confirms)
    3. the new version is published to the buffer and producers
    4. continue every engine (`/continue_generation`)

`continue` runs even if step 2 fails, so a failed sync never leaves engines paused (no deadlock); the error is then
raised to the driver, naming the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

_CLIENT: httpx.Client | None = None


def http_client() -> httpx.Client:
    """One client per process: building an httpx.Client costs 25-60 ms (SSL context), more than a whole sync."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0))
    return _CLIENT


def post_json(url: str, path: str, body: dict, timeout: float = 120.0) -> dict:
    r = http_client().post(url + path, json=body, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"engine {url}: POST {path} -> HTTP {r.status_code}: {r.text[:300]}")
    return r.json() if r.content else {}


def sync_weights(engine_urls: list[str], push: Callable[[], dict], publish: Callable[[], None],
                 stage: Callable[[], dict | None] | None = None) -> dict[str, float]:
    """Run the (stage) -> pause -> push -> publish -> continue sequence; returns timings (seconds).

    `stage` runs before the pause, while the engines still generate (packing buckets, writing files), so the
    engines stop only for the push itself."""
    t0 = time.time()
    staged = dict(stage() or {}) if stage is not None else {}
    t_staged = time.time()
    for url in engine_urls:
        post_json(url, "/pause_generation", {})
    t_paused = time.time()
    try:
        stats = {**staged, **dict(push() or {})}
        publish()
    finally:
        for url in engine_urls:
            post_json(url, "/continue_generation", {})
    stats.update(sync_stage_time=t_staged - t0, sync_pause_time=t_paused - t_staged,
                 sync_total_time=time.time() - t0, sync_engine_downtime=time.time() - t_staged)
    return stats
