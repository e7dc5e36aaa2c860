"""The job's engines as the driver sees them: which ones a weight sync goes to; dead ones out, replacements in.

    pool = EnginePool(args, actors, urls, manager, router_url, spawn)   # launch.build; the lists are Components'
    pool.before_sync()                          # engines that fail /health leave; ready replacements join the sync
    sync_weights(pool.urls, ..., on_dead=pool.drop)   # one that fails its pause or push (and /health) leaves too
    pool.after_sync()                           # replacements, now on the current weights, get /generate traffic

An engine leaves when it does not answer `/health` within `--rollout-health-check-timeout` (killed: refused;
frozen by SIGSTOP or a hang: no answer): a warning names its URL and the cause, `engine_failures` counts it, its
actor is killed (a frozen engine must not come back with old weights) and the producers and the router stop
sending to it (their own client also drops it as soon as a request to it fails: streamrl/rollout/client.py).
With `--use-fault-tolerance` (slime's flag) a replacement engine starts at once and joins at the next weight sync,
so that it serves only the current weights. When no engine is left the job fails with the causes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import httpx
import ray

from streamrl.rollout.sglang import router
from streamrl.sync.base import http_client

logger = logging.getLogger("streamrl.engines")


class EnginePool:
    def __init__(self, args: argparse.Namespace, actors: list[Any], urls: list[str], manager: Any,
                 router_url: str | None = None, spawn: Callable[[], tuple[Any, Any]] | None = None):
        self.args, self.manager, self.router_url, self.spawn = args, manager, router_url, spawn
        self.actors, self.urls = actors, urls  # the same list objects as Components.engines / engine_urls
        self._actor_of = dict(zip(urls, actors, strict=True))
        self.dead: dict[str, str] = {}  # url -> cause
        self.restarts = 0
        self._starting: list[tuple[Any, Any]] = []  # (actor, ref of its URL) of replacements not yet serving
        self._joining: list[str] = []  # replacements synced but not yet routed to

    def alive(self, url: str) -> bool:

        try:
            return http_client().get(url + "/health", timeout=self.args.rollout_health_check_timeout).is_success
        except httpx.HTTPError:
            return False

    def drop(self, url: str, cause: str, probe: bool = True) -> bool:
        """Remove `url` if it is dead (after a failed call: `probe` checks /health first); True if it was."""

        if url not in self.urls:
            return url in self.dead
        if probe and self.alive(url):
            return False
        self.urls.remove(url)
        self.dead[url] = cause[:500]
        logger.warning("engine %s failed (%s): removed from routing and weight syncs; %d live engine(s) left",
                       url, cause[:300], len(self.urls))
        actor = self._actor_of.pop(url, None)
        if actor is not None:
            self.actors.remove(actor)
            ray.kill(actor)
        self.manager.remove_engine.remote(url)  # not awaited: its client may well have dropped it already
        if self.router_url:
            self._router_call("remove_worker", url)
        if self.spawn is not None:
            self._starting.append(self.spawn())
            self.restarts += 1
        if not self.urls and not self._starting:
            raise RuntimeError("every engine is dead: " + "; ".join(f"{u} ({why})" for u, why in self.dead.items()))
        return True

    def before_sync(self) -> None:
        """Drop engines that fail /health; started replacements that serve now join this sync (waiting for them
        when no other engine is left)."""

        timeout = self.args.rollout_health_check_timeout
        for url in list(self.urls):
            if not self.alive(url):
                self.drop(url, f"no /health answer within {timeout:g}s before a weight sync", probe=False)
        for actor, ref in list(self._starting):
            if self.urls and not ray.wait([ref], timeout=0)[0]:
                continue  # still loading: it joins at a later sync
            self._starting.remove((actor, ref))
            try:
                url = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a replacement that cannot start is reported, not fatal
                logger.warning("replacement engine failed to start: %s", str(e).splitlines()[0][:300])
                ray.kill(actor)
                continue
            self.urls.append(url)
            self.actors.append(actor)
            self._actor_of[url] = actor
            self._joining.append(url)
        if not self.urls:
            raise RuntimeError("every engine is dead: " + "; ".join(f"{u} ({why})" for u, why in self.dead.items()))

    def after_sync(self) -> None:
        """Route to the engines that joined at this sync (they hold the current weights now)."""

        for url in self._joining:
            if url not in self.urls:
                continue
            ray.get(self.manager.add_engine.remote(url))
            if self.router_url:
                self._router_call("add_worker", url)
            logger.warning("engine %s joined (a replacement, on the current weights); %d live engine(s)", url,
                           len(self.urls))
        self._joining.clear()

    def wait_replacements(self) -> None:
        """Block until every replacement started so far serves (or failed), so that it joins at the next sync
        (tests, and jobs that would rather wait than run short of engines)."""

        ray.wait([ref for _, ref in self._starting], num_returns=len(self._starting))

    def stats(self) -> dict[str, int]:
        return {"engine_failures": len(self.dead), "engines_live": len(self.urls), "engine_restarts": self.restarts}

    def _router_call(self, name: str, url: str) -> None:

        try:
            getattr(router, name)(self.router_url, url, timeout=self.args.rollout_engine_startup_timeout)
        except Exception as e:  # noqa: BLE001 - the router is best effort: the producers' client drops it too
            logger.warning("router %s: %s %s failed: %s", self.router_url, name, url, e)
