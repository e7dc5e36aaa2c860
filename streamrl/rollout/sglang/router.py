"""sglang-router: started by streamrl on 127.0.0.1 in front of the engines, and its `/workers` admin API.

The router and its Prometheus endpoint listen on 127.0.0.1 only; the process dies with the one that started it
(ManagedProcess: parent-death signal), so a killed driver leaves no router behind.

    router = start_router(args, worker_urls)        # python -m sglang_router.launch_router ... (a child process)
    add_worker(router.url, url); remove_worker(router.url, url); list_workers(router.url)

What the router does and does not do (sglang-router 0.3.2, checked by tests/test_router.py):
  * proxies `/generate`, re-serialising the body through its own schema: a batch (`input_ids` as a list of lists)
    works with ONE `sampling_params` dict and no `rid` list (a list of either is a 422), so producers send one
    request per group and distinct token budget;
  * does not proxy `/abort_request`, `/pause_generation`, `/continue_generation` or weight updates (404): those go
    to each worker URL;
  * with `--router-dp-aware` lists a worker once per data-parallel rank as `URL@rank` (dp_size from the worker's
    `/get_server_info`); `worker_base_url` maps those back to the server's URL. Removing such a worker fails
    inside the router (0.3.2 logs "No workers found with prefix URL@0@"), so `remove_worker` times out there;
  * adds and removes workers asynchronously (`POST /workers` / `DELETE /workers/{id}` answer 202): the helpers
    here wait until `GET /workers` shows the change. A worker is listed only once its `/health` answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx

from streamrl.net import free_port
from streamrl.passthrough import to_cli
from streamrl.rollout.sglang.proc import LaunchError, ManagedProcess

# slime's choices (slime/ray/rollout.py `_start_router`), applied unless the matching --router-* flag is given.
ROUTER_DEFAULTS = {"balance_abs_threshold": 10, "balance_rel_threshold": 1.2, "log_level": "warn",
                   "disable_circuit_breaker": True}


class RouterProcess(ManagedProcess):
    def __init__(self, argv: list[str], host: str, port: int, log_path: str | None = None):
        super().__init__(argv, f"sglang-router at {host}:{port}", log_path)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def router_command(args: argparse.Namespace, worker_urls: list[str], host: str, port: int,
                   prometheus_port: int) -> list[str]:

    # metrics on the router's own host (sglang-router's default is 0.0.0.0: every interface)
    defaults = {**ROUTER_DEFAULTS, "request_timeout_secs": args.sglang_router_request_timeout_secs,
                "prometheus_port": prometheus_port, "prometheus_host": host}
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port)]
    if worker_urls:
        argv += ["--worker-urls", *worker_urls]
    return argv + to_cli("router", args, defaults=defaults)


def start_router(args: argparse.Namespace, worker_urls: list[str], log_path: str | None = None,
                 timeout: float | None = None) -> RouterProcess:
    """Start sglang-router on 127.0.0.1 with `worker_urls` and wait until it lists all of them as workers."""
    try:
        import sglang_router  # noqa: F401 - only to fail early with the install hint
    except ImportError as e:
        raise LaunchError("the router needs the sglang-router package: pip install 'streamrl[sglang]' "
                          "(or drop --use-router)") from e
    host = "127.0.0.1"
    port = free_port(host)
    argv = router_command(args, worker_urls, host, port, free_port(host, avoid={port}))
    timeout = timeout or args.rollout_engine_startup_timeout
    router = RouterProcess(argv, host, port, log_path).start()
    try:
        router.wait_ready(router.url + "/health", timeout)
        wait_workers(router.url, present=worker_urls, timeout=timeout, proc=router)
    except BaseException:
        router.stop()
        raise
    return router


def worker_base_url(url: str) -> str:
    """`http://h:p@3` (a dp-aware router's per-rank worker) -> `http://h:p`; other URLs unchanged."""
    base, sep, rank = url.rpartition("@")
    return base if sep and rank.isdigit() else url


def list_workers(router_url: str, client: httpx.Client | None = None) -> list[dict[str, Any]]:
    """`GET /workers` -> the router's worker records (`id`, `url`, `is_healthy`, ...)."""
    c = client or httpx.Client(timeout=10.0)
    try:
        r = c.get(router_url + "/workers")
        if r.status_code != 200:
            raise RuntimeError(f"router {router_url}: GET /workers -> HTTP {r.status_code}: {r.text[:300]}")
        return list(r.json().get("workers", []))
    finally:
        if client is None:
            c.close()


def wait_workers(router_url: str, present: list[str] = (), absent: list[str] = (), timeout: float = 60.0,
                 proc: ManagedProcess | None = None) -> None:
    """Poll `GET /workers` until every URL of `present` is listed and none of `absent` is."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10.0) as client:
        while True:
            urls = {worker_base_url(w["url"]) for w in list_workers(router_url, client)}
            missing, left = set(present) - urls, set(absent) & urls
            if not missing and not left:
                return
            why = (f"router {router_url} did not register {sorted(missing)} within {timeout:.0f}s (it adds a "
                   f"worker once its /health answers)" if missing else
                   f"router {router_url} still lists {sorted(left)} after {timeout:.0f}s")
            if proc is not None and not proc.alive():
                raise proc.fail(f"exited while waiting for workers; {why}")
            if time.monotonic() > deadline:
                raise proc.fail(why) if proc is not None else LaunchError(why)
            time.sleep(0.1)  # polling a condition


def add_worker(router_url: str, worker_url: str, timeout: float = 60.0) -> None:
    """Register `worker_url` with the router and wait until it is listed (it must answer /health)."""
    if any(worker_base_url(w["url"]) == worker_url for w in list_workers(router_url)):
        return
    r = httpx.post(router_url + "/workers", json={"url": worker_url}, timeout=30.0)
    if r.status_code not in (200, 201, 202):
        raise LaunchError(f"router {router_url}: POST /workers {worker_url} -> HTTP {r.status_code}: {r.text[:300]}")
    wait_workers(router_url, present=[worker_url], timeout=timeout)


def remove_worker(router_url: str, worker_url: str, timeout: float = 60.0) -> None:
    """De-register `worker_url` (in-flight requests on it finish; new ones go elsewhere) and wait until gone."""
    ids = [w["id"] for w in list_workers(router_url) if worker_base_url(w["url"]) == worker_url]
    for wid in ids:
        r = httpx.delete(f"{router_url}/workers/{wid}", timeout=30.0)
        if r.status_code not in (200, 202, 204, 404):
            raise LaunchError(f"router {router_url}: DELETE /workers/{wid} ({worker_url}) -> HTTP {r.status_code}: "
                              f"{r.text[:300]}")
    wait_workers(router_url, absent=[worker_url], timeout=timeout)
