"""The weight-sync sequence shared by every transport (docs/design.md, "Weight sync and partial rollouts").

    0. stage the new weights (optional, while the engines still generate)
    1. pause every engine (`/pause_generation`). Mode "abort": in-flight requests return their prefixes, which the
       producers resubmit as partial rollouts; requests arriving during the pause wait. Mode "in_place": in-flight
       requests stay in the engine and go on under the new weights after step 4 (no round trip through the
       producers, which costs seconds when hundreds of requests are in flight)
    2. the trainer pushes its weights with the new version (transport-specific; each engine confirms)
    3. the new version is published to the buffer and producers
    4. continue every engine (`/continue_generation`)

`continue` runs even if step 2 fails, so a failed sync never leaves engines paused (no deadlock); the error is then
raised to the driver, naming the engine. With `on_dead` (the driver's EnginePool.drop) an engine that fails its
pause or the push and is then found dead leaves the sync and the job instead: the others are synced (the push is
sent once more to them when it failed), so one lost engine never stops the job.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import msgspec

_CLIENT: httpx.Client | None = None


def http_client() -> httpx.Client:
    """One client per process: building an httpx.Client costs 25-60 ms (SSL context), more than a whole sync."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0))
    return _CLIENT


_PAUSER: ThreadPoolExecutor | None = None


def _pauser() -> ThreadPoolExecutor:
    """One long-lived thread for pause requests (so that its kept-alive connections are reused)."""
    global _PAUSER
    if _PAUSER is None:
        _PAUSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamrl-sync-pause")
    return _PAUSER


_CONNS = threading.local()  # per thread: {(host, port): http.client.HTTPConnection}


def control_post(url: str, path: str, body: bytes, content_type: str = "application/json",
                 timeout: float = 300.0) -> tuple[int, bytes]:
    """POST on a kept-alive stdlib connection: (status, body). For the weight-sync sequence (pause, push,
    continue), where httpx's per-request overhead (~0.4 ms) is a large part of a millisecond-scale sync. A
    connection the server has closed is reopened and the request sent once more (every sync call is idempotent).
    """
    parts = urlsplit(url)
    key = (parts.hostname, parts.port or 80)
    conns = _CONNS.__dict__.setdefault("conns", {})
    for attempt in (0, 1):
        conn = conns.get(key)
        fresh = conn is None
        if fresh:
            conn = conns[key] = http.client.HTTPConnection(*key, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers={"content-type": content_type})
            r = conn.getresponse()
            return r.status, r.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                http.client.CannotSendRequest, http.client.ResponseNotReady) as e:
            conn.close()
            conns.pop(key, None)
            if fresh or attempt:
                raise ConnectionError(f"engine {url}: POST {path} failed: {type(e).__name__}: {e}") from None
        except OSError as e:  # refused, timed out: the engine is down or stuck
            conn.close()
            conns.pop(key, None)
            raise ConnectionError(f"engine {url}: POST {path} failed: {type(e).__name__}: {e}") from None
    raise AssertionError("unreachable")


def post_update(engine_urls: list[str], path: str, body: bytes, version: int, what: str) -> float:
    """POST a msgpack weight-update body to every engine; each must answer success. Returns the slowest engine's
    reported `copy_time` (seconds)."""

    copy_s = 0.0
    for url in engine_urls:
        status, raw = control_post(url, path, body, "application/msgpack")
        out = msgspec.json.decode(raw) if raw else {}
        if status != 200 or not out.get("success", False):
            raise RuntimeError(f"engine {url}: {what} weight update to version {version} failed: "
                               f"HTTP {status}: {raw[:300].decode(errors='replace')}")
        copy_s = max(copy_s, float(out.get("copy_time", 0.0)))
    return copy_s


def post_json(url: str, path: str, body: dict, timeout: float = 120.0) -> dict:
    status, raw = control_post(url, path, json.dumps(body).encode(), timeout=timeout)
    if status != 200:
        raise RuntimeError(f"engine {url}: POST {path} -> HTTP {status}: {raw[:300].decode(errors='replace')}")
    return json.loads(raw) if raw else {}


def sync_weights(engine_urls: list[str], push: Callable[[], dict], publish: Callable[[], dict | None],
                 stage: Callable[[], dict | None] | None = None, pause_while_staging: bool = False,
                 pause_mode: str = "abort", on_dead: Callable[[str, str], bool] | None = None) -> dict[str, float]:
    """Run the (stage) -> pause -> push -> publish -> continue sequence; returns timings (seconds).

    `stage` (packing buckets, writing files) runs before the pause, while the engines still generate, so they
    stop only for the push. `pause_while_staging`: send the pause requests at the same time instead, for a stage
    of about a millisecond (CUDA IPC), where the overlap shortens the whole sync. `on_dead(url, cause)`: asked
    about an engine whose pause or push failed; True means it is dead and was removed from `engine_urls` (which
    `push` reads), so the sync goes on without it."""
    t0 = time.time()
    paused: list[str] = []
    failed: BaseException | None = None

    def pause() -> float:
        for url in list(engine_urls):
            try:
                post_json(url, "/pause_generation", {"mode": pause_mode})
            except (ConnectionError, RuntimeError) as e:
                if on_dead is None or not on_dead(url, str(e)):
                    raise
                continue
            paused.append(url)
        return time.time()

    def push_live() -> dict:
        try:
            return dict(push() or {})
        except Exception as e:
            if on_dead is None or not engine_urls:
                raise
            gone = [u for u in list(engine_urls) if on_dead(u, f"weight push failed: {e}")]
            if not gone:
                raise
            if stage is not None:  # a push consumes what was staged (buffers, handles): stage it again
                stage()
            return dict(push() or {})  # to the live engines again (an update is idempotent)

    try:
        # the pause requests go out while this thread stages (host work and queued device copies): both take
        # about a millisecond or two, and neither needs the other
        pausing = _pauser().submit(pause) if pause_while_staging else None
        try:
            staged = dict(stage() or {}) if stage is not None else {}
        finally:
            t_paused = pausing.result() if pausing is not None else None
        t_staged = time.time()
        if t_paused is None:
            t_paused = pause()
        stats = {**staged, **push_live()}
        t_pushed = time.time()
        stats.update(publish() or {})
        t_published = time.time()
    except BaseException as e:
        failed = e
        raise
    finally:  # every engine that was paused is continued, whatever failed (a dead one must not block the rest)
        errors = []
        for url in [u for u in paused if u in engine_urls]:  # not the ones found dead meanwhile
            try:
                post_json(url, "/continue_generation", {})
            except Exception as e:  # noqa: BLE001 - collected, raised below unless something failed before
                if on_dead is None or not on_dead(url, f"continue failed: {e}"):  # died after its pause: gone
                    errors.append(e)
        if errors and failed is None:
            raise errors[0]
    end = time.time()
    t_pause_sent = t0 if pause_while_staging else t_staged
    stats.update(sync_stage_time=t_staged - t0, sync_pause_time=t_paused - t_pause_sent, sync_total_time=end - t0,
                 sync_engine_downtime=end - t_pause_sent, sync_publish_time=t_published - t_pushed,
                 sync_continue_time=end - t_published)
    return stats
