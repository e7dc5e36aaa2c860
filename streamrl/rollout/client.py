"""One async HTTP client for every engine kind (embedded or SGLang, direct or behind sglang-router).

    client = EngineClient(worker_urls, router_url=None)
    out = await client.generate(payload)                   # router if any, else the least busy worker
    async for chunk in client.generate_stream(payload): ...  # cumulative SSE events ("stream": true)
    await client.abort(); await client.pause(); await client.resume()   # every worker (routers don't proxy these)
    await client.weight_versions(); await client.health(url); await client.loads(url); await client.wait_idle()

Retries (bounded, exponential backoff): a connection error before the request was sent is retried for every call;
a broken connection or a 5xx after sending is retried only for idempotent calls (GETs, abort, pause, continue), never
for `/generate` on the same engine (it would generate twice). After the last attempt `EngineError` names the URL,
path and cause.

Dead engines (failover): a worker whose request fails and that then does not answer `/health` within
`health_check_timeout` (killed: refused or reset; frozen: no answer) is dead. It is dropped from routing and from
the fan-out (and from the router, if any), logged with its URL and counted (`failures`, `dead`); its in-flight
`/generate` calls are sent again, as they were (prompt + the prefix the caller already holds), to a live engine, so
a sample never fails for it; a streamed call raises `EngineLost` and the caller keeps its prefix (a partial
rollout). With `health_check_interval` > 0 a watchdog probes every worker that often, which is what catches a
frozen engine (a request to it just waits). When no live engine is left `NoEngineError` names them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx

from streamrl.rollout.sglang.router import worker_base_url

logger = logging.getLogger("streamrl.rollout.client")


class EngineError(RuntimeError):
    """An engine could not serve a request (the message names the engine URL)."""


class NoEngineError(RuntimeError):
    """Every engine is dead (the message names each with its cause). Not an EngineError on purpose: the producers
    must stop with it (the driver then fails naming the engines), not mark group after group failed."""


class EngineLost(EngineError):
    """The engine serving a streamed request died mid-stream (it was dropped from routing); the caller keeps what
    it received and resubmits the rest elsewhere."""


_CONNECTIONS_PER_POOL = 32
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never left: always safe to retry
_BROKEN = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.PoolTimeout)


class EngineClient:
    def __init__(self, urls: list[str], router_url: str | None = None, max_connections: int = 256, retries: int = 4,
                 retry_wait: float = 0.25, max_retry_wait: float = 4.0, timeout: float | None = None,
                 connect_timeout: float = 10.0, connections_per_pool: int = _CONNECTIONS_PER_POOL,
                 health_check_interval: float = 0.0, health_check_timeout: float = 20.0):
        if not urls and not router_url:
            raise ValueError("EngineClient needs at least one engine URL or a router URL")
        self.urls = list(urls)
        self.router_url = router_url
        self.in_flight = {u: 0 for u in self.urls}
        self.health_check_interval, self.health_check_timeout = health_check_interval, health_check_timeout
        self.dead: dict[str, str] = {}  # url -> why it was dropped
        self.failures = 0
        self._scopes: dict[str, set[anyio.CancelScope]] = {}  # in-flight /generate calls per worker (cancelled if dead)
        self._watchdog: asyncio.Task | None = None
        self._health: httpx.AsyncClient | None = None
        self.retries, self.retry_wait, self.max_retry_wait = retries, retry_wait, max_retry_wait
        # No keep-alive: with a hundred-odd concurrent requests httpcore's pool of reused connections is several
        # times slower than fresh loopback connections, and stalls for seconds.
        # Several small pools, not one big one: httpcore scans its whole pool for every request it assigns
        # (quadratic in the requests in flight); with hundreds of per-sample requests in flight that scan was most
        # of the producers' CPU and starved the engine (scripts/bench/client_concurrency.py).
        shards = max(1, -(-max_connections // connections_per_pool))
        limits = httpx.Limits(max_connections=-(-max_connections // shards), max_keepalive_connections=0)
        self._pools = [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=connect_timeout))
                       for _ in range(shards)]
        self._pool_load = [0] * shards
        self.http = self._pools[0]  # control calls (health, abort, pause) and anything not in flight for long

    # --- workers ----------------------------------------------------------------------------------------------
    def add_worker(self, url: str) -> None:
        if url not in self.in_flight:
            self.urls.append(url)
            self.in_flight[url] = 0

    def remove_worker(self, url: str) -> None:
        if url in self.in_flight:
            self.urls.remove(url)
            del self.in_flight[url]

    # --- dead engines -----------------------------------------------------------------------------------------
    async def alive(self, url: str) -> bool:
        """True when `url` answers /health with 2xx within `health_check_timeout`. Probes have their own small pool:
        requests hung on a frozen engine must not starve the probe of a healthy one."""
        if self._health is None:
            self._health = httpx.AsyncClient(limits=httpx.Limits(max_connections=8, max_keepalive_connections=0))
        try:
            r = await self._health.get(url + "/health", timeout=self.health_check_timeout)
        except httpx.HTTPError:
            return False
        return r.is_success

    async def drop_if_dead(self, url: str, cause: object) -> bool:
        """After a failed call to `url`: if it does not answer /health either, drop it (see the module docstring)
        and return True; False when it is alive (the failure was the request's own) or not one of our workers."""
        if url in self.dead:
            return True
        if url not in self.in_flight or await self.alive(url):
            return False
        await self.mark_dead(url, str(cause))
        return True

    async def mark_dead(self, url: str, cause: str) -> None:
        if url in self.dead:
            return
        self.dead[url] = cause[:500]
        self.failures += 1
        self.remove_worker(url)
        logger.warning("engine %s failed (%s): removed from routing, its requests go to the %d live engine(s)",
                       url, cause[:300], len(self.urls))
        for scope in self._scopes.pop(url, set()):
            scope.cancel()
        if self.router_url:  # the router keeps sending to a worker until it is de-registered
            with contextlib.suppress(EngineError, httpx.HTTPError):
                body = await self._request("GET", self.router_url, "/workers", idempotent=True)
                for w in (body or {}).get("workers", []):
                    if w.get("url") == url:
                        await self.http.delete(f"{self.router_url}/workers/{w['id']}", timeout=30.0)

    def _ensure_watchdog(self) -> None:
        if self.health_check_interval > 0 and self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Probe every worker every `health_check_interval` seconds; one that does not answer is dead."""
        while True:
            await anyio.sleep(self.health_check_interval)  # a heartbeat period, not a wait for a condition
            async with anyio.create_task_group() as tg:
                for url in list(self.urls):
                    tg.start_soon(self._probe, url)

    async def _probe(self, url: str) -> None:
        try:
            if not await self.alive(url):
                await self.mark_dead(url, f"no /health answer within {self.health_check_timeout:g}s")
        except Exception:  # the watchdog must outlive any one probe
            logger.exception("health probe of %s failed", url)

    @contextlib.contextmanager
    def _cancellable(self, url: str) -> Iterator[anyio.CancelScope]:
        """A cancel scope for one call to `url`, cancelled if the worker is found dead meanwhile."""
        with anyio.CancelScope() as scope:
            self._scopes.setdefault(url, set()).add(scope)
            try:
                yield scope
            finally:
                self._scopes.get(url, set()).discard(scope)

    async def refresh_workers(self) -> list[str]:
        """Take the worker list from the router (`GET /workers`): an external router may gain or lose engines."""
        if not self.router_url:
            return list(self.urls)
        body = await self._request("GET", self.router_url, "/workers", idempotent=True)
        urls = list(dict.fromkeys(worker_base_url(w["url"]) for w in body.get("workers", [])))  # dp-aware: URL@rank
        for u in urls:
            self.add_worker(u)
        for u in [u for u in self.urls if u not in urls]:
            self.remove_worker(u)
        return list(self.urls)

    @contextlib.contextmanager
    def _lease(self) -> Iterator[httpx.AsyncClient]:
        """The least loaded of the connection pools, for one request."""
        i = min(range(len(self._pools)), key=self._pool_load.__getitem__)
        self._pool_load[i] += 1
        try:
            yield self._pools[i]
        finally:
            self._pool_load[i] -= 1

    def _pick(self) -> str:
        if self.router_url:
            return self.router_url
        if not self.urls:
            dead = "".join(f"; {u}: {why}" for u, why in self.dead.items())
            raise NoEngineError(f"no engine to send /generate to (every worker was removed){dead}")
        return min(self.urls, key=lambda u: self.in_flight[u])

    # --- the request loop -------------------------------------------------------------------------------------
    async def _backoff(self, attempt: int) -> None:
        await anyio.sleep(min(self.max_retry_wait, self.retry_wait * 2**attempt))

    async def _request(self, method: str, url: str, path: str, body: Any = None, *, idempotent: bool,
                       timeout: float | None = None) -> Any:
        """Send with bounded retries; returns the decoded JSON body (None when empty)."""
        last: BaseException | str | None = None
        kw: dict[str, Any] = {"json": body} if body is not None else {}
        if timeout is not None:
            kw["timeout"] = timeout
        for attempt in range(self.retries + 1):
            if attempt:
                await self._backoff(attempt - 1)
            try:
                with self._lease() as http:
                    r = await http.request(method, url + path, **kw)
            except _NOT_SENT as e:
                last = e
                continue
            except _BROKEN as e:
                if not idempotent:
                    raise EngineError(f"engine {url}: {method} {path} failed after sending: {e!r} (not retried: "
                                      f"not idempotent)") from e
                last = e
                continue
            if r.status_code >= 500 and idempotent:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if not r.is_success:
                raise EngineError(f"engine {url}: {method} {path} -> HTTP {r.status_code}: {r.text[:300]}")
            return r.json() if r.content.strip() else None
        raise EngineError(f"engine {url}: {method} {path} failed {self.retries + 1} times; last error: {last!r}")

    # --- generation -------------------------------------------------------------------------------------------
    async def generate(self, payload: dict, timeout: float | None = None) -> Any:
        """POST /generate; SGLang's response dict (`text`, `output_ids`, `meta_info`), or a list for a batch. A call
        whose engine dies is sent again to a live one (the same payload: nothing was returned for it)."""
        self._ensure_watchdog()
        while True:
            url = self._pick()
            self.in_flight[url] = self.in_flight.get(url, 0) + 1
            try:
                with self._cancellable(url):
                    return await self._request("POST", url, "/generate", payload, idempotent=False, timeout=timeout)
            except EngineError as e:
                # behind a router any worker may have failed it: probe them all
                suspects = list(self.urls) if self.router_url else [url]
                if not any([await self.drop_if_dead(u, e) for u in suspects]):
                    raise
            finally:
                if url in self.in_flight:
                    self.in_flight[url] -= 1
            # here: the engine was dropped (its call failed, or the watchdog cancelled it): try a live one

    async def generate_stream(self, payload: dict) -> AsyncIterator[dict]:
        """POST /generate with `"stream": true`; yields SGLang's cumulative events (each holds all output so far).

        A streamed error event (HTTP 200 with `{"error": ...}`) raises EngineError. If the connection breaks
        mid-stream the exception propagates (`EngineLost` when the engine is dead): the caller keeps the last event
        as a coherent prefix.
        """
        self._ensure_watchdog()
        url = self._pick()
        self.in_flight[url] = self.in_flight.get(url, 0) + 1
        try:
            async for event in self._stream(url, payload):
                yield event
        except (EngineError, *_BROKEN) as e:
            if isinstance(e, EngineLost):
                raise
            suspects = list(self.urls) if self.router_url else [url]
            if not any([await self.drop_if_dead(u, e) for u in suspects]):
                raise
            raise EngineLost(f"engine {url} died during a streamed /generate: {e!r}") from e
        finally:
            if url in self.in_flight:
                self.in_flight[url] -= 1

    async def _stream(self, url: str, payload: dict) -> AsyncIterator[dict]:
        """`_stream_once`, each wait for the next event cancellable by the watchdog (never across a yield)."""
        events = self._stream_once(url, payload)
        try:
            while True:
                with self._cancellable(url) as scope:
                    try:
                        event = await events.__anext__()
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    raise EngineLost(f"engine {url} dropped by the health check during a streamed /generate")
                yield event
        finally:
            await events.aclose()

    async def _stream_once(self, url: str, payload: dict) -> AsyncIterator[dict]:
        for attempt in range(self.retries + 1):
            if attempt:
                await self._backoff(attempt - 1)
            try:
                with self._lease() as http:
                    async with http.stream("POST", url + "/generate", json={**payload, "stream": True}) as r:
                        if not r.is_success:
                            await r.aread()
                            raise EngineError(f"engine {url}: POST /generate (stream) -> HTTP {r.status_code}: "
                                              f"{r.text[:300]}")
                        async for line in r.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            data = line[5:].strip()
                            if data == "[DONE]":
                                return
                            event = json.loads(data)
                            if isinstance(event, dict) and "error" in event:
                                raise EngineError(f"engine {url}: streamed error: {str(event['error'])[:300]}")
                            yield event
                return
            except _NOT_SENT as e:
                if attempt == self.retries:
                    raise EngineError(f"engine {url}: POST /generate (stream) failed {attempt + 1} times: "
                                      f"{e!r}") from e

    # --- control: every worker --------------------------------------------------------------------------------
    async def post_all(self, path: str, body: dict, idempotent: bool = True) -> None:
        """POST `body` to `path` on every worker (abort, pause, continue are not proxied by routers)."""
        errors: list[str] = []

        async def one(u: str) -> None:
            try:
                await self._request("POST", u, path, body, idempotent=idempotent)
            except EngineError as e:  # every worker is tried; one error names all that failed (a dead one: dropped)
                if not await self.drop_if_dead(u, e):
                    errors.append(str(e))

        async with anyio.create_task_group() as tg:
            for url in list(self.urls):
                tg.start_soon(one, url)
        if errors:
            raise EngineError("; ".join(errors))

    async def abort(self, rid: str | None = None) -> None:
        """Abort one request (`rid`) or everything in flight on every worker; aborted requests return prefixes."""
        await self.post_all("/abort_request", {"rid": rid} if rid else {"abort_all": True})

    async def pause(self, mode: str = "abort") -> None:
        await self.post_all("/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self.post_all("/continue_generation", {})

    async def weight_versions(self) -> dict[str, str]:
        out: dict[str, str] = {}

        async def one(u: str) -> None:
            out[u] = str((await self._request("GET", u, "/get_weight_version", idempotent=True))["weight_version"])

        async with anyio.create_task_group() as tg:
            for url in list(self.urls):
                tg.start_soon(one, url)
        return out

    async def health(self, url: str | None = None) -> bool:
        """True when `url` (default: the router, else every worker) answers /health with 2xx."""
        targets = [url] if url else ([self.router_url] if self.router_url else list(self.urls))
        try:
            for u in targets:
                r = await self.http.get(u + "/health", timeout=10.0)
                if not r.is_success:
                    return False
        except httpx.TransportError:
            return False
        return True

    async def loads(self, url: str) -> dict[str, int]:
        """Running and waiting requests of one worker (`GET /v1/loads?include=core`, summed over DP ranks)."""
        body = await self._request("GET", url, "/v1/loads?include=core", idempotent=True)
        ranks = body.get("loads") or [body]
        return {k: sum(int(r.get(k, 0)) for r in ranks) for k in ("num_running_reqs", "num_waiting_reqs")}

    async def wait_idle(self, timeout: float = 60.0, poll: float = 0.1) -> None:
        """Wait until no worker runs or queues a request (slime polls this after `abort_all`)."""
        with anyio.fail_after(timeout):
            while True:
                loads = [await self.loads(u) for u in list(self.urls)]
                if all(sum(x.values()) == 0 for x in loads):
                    return
                await anyio.sleep(poll)  # polling a condition

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._health is not None:
            await self._health.aclose()
        for http in self._pools:
            await http.aclose()
