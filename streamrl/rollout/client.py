"""One async HTTP client for every engine kind (embedded or SGLang, direct or behind sglang-router).

Requests go to the engine with the fewest requests in flight from this client (a router URL is just a single
"engine"). Connection failures are retried; an engine that keeps failing raises `EngineError` naming it.
"""

from __future__ import annotations

import anyio
import httpx


class EngineError(RuntimeError):
    """An engine could not serve a request (the message names the engine URL)."""


class EngineClient:
    def __init__(self, urls: list[str], max_connections: int = 256, retries: int = 5, retry_wait: float = 1.0):
        if not urls:
            raise ValueError("EngineClient needs at least one engine URL")
        self.urls = list(urls)
        self.in_flight = {u: 0 for u in self.urls}
        self.retries, self.retry_wait = retries, retry_wait
        # No keep-alive: with a hundred-odd concurrent requests httpcore's pool of reused connections is several
        # times slower than fresh loopback connections, and stalls for seconds (scripts/bench/http_client.py).
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=0)
        self.http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10.0))

    def _pick(self) -> str:
        return min(self.urls, key=lambda u: self.in_flight[u])

    async def generate(self, payload: dict) -> dict:
        """POST /generate; returns SGLang's response dict (`text`, `output_ids`, `meta_info`)."""
        url = self._pick()
        self.in_flight[url] += 1
        try:
            for attempt in range(self.retries + 1):
                try:
                    r = await self.http.post(url + "/generate", json=payload)
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                    if attempt == self.retries:
                        raise EngineError(f"engine {url}: /generate failed {self.retries + 1} times: {e!r}") from e
                    await anyio.sleep(self.retry_wait)
                    continue
                if r.status_code != 200:
                    raise EngineError(f"engine {url}: /generate -> HTTP {r.status_code}: {r.text[:300]}")
                return r.json()
        finally:
            self.in_flight[url] -= 1
        raise AssertionError("unreachable")

    async def post_all(self, path: str, body: dict) -> None:
        """POST `body` to `path` on every engine (abort, pause, continue are not proxied by routers)."""
        async with anyio.create_task_group() as tg:
            for url in self.urls:
                tg.start_soon(self._post, url, path, body)

    async def _post(self, url: str, path: str, body: dict) -> None:
        r = await self.http.post(url + path, json=body)
        if r.status_code != 200:
            raise EngineError(f"engine {url}: POST {path} -> HTTP {r.status_code}: {r.text[:300]}")

    async def aclose(self) -> None:
        await self.http.aclose()
