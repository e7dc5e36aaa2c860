"""Start the moving parts as Ray actors: engines, router, buffer, producers (RolloutManager), trainer ranks.

Ray starts a local cluster itself, bound to 127.0.0.1, unless `--ray-address` is given. CPU counts are bookkeeping
only on a laptop: actors ask for 0 CPUs and each sets its own torch thread count (`--engine-torch-threads`,
`--train-torch-threads`).

Engines: `--rollout-engine embedded` (the in-repo engine, CPU or GPU) or `sglang` (real SGLang servers,
`streamrl/rollout/sglang/launcher.py`). Router (`args.router_mode`, set by validate):
  * "local": streamrl starts sglang-router on 127.0.0.1 in front of the engines: always with SGLang engines, and
    with embedded engines under `--use-router`. Producers post /generate to it;
  * "external": `--sglang-router-ip/--sglang-router-port`: the engines register with that router (and leave it at
    shutdown);
  * "none" (embedded default): producers balance /generate over the engines themselves (fewest in flight).
Abort, pause/continue and weight updates always go to every engine URL: routers do not proxy them.
`args.sglang_router_ip/port` point at the router when there is one (slime plug-ins post there).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray

from buffers.queue import make_buffer_actor
from streamrl.engine.actor import make_engine_actor
from streamrl.engine.kv import DEFAULT_MAX_PREFILL_TOKENS
from streamrl.mps import MpsDaemon
from streamrl.placement import gpu_shares
from streamrl.rollout.manager import RolloutManager
from streamrl.rollout.pool import EnginePool
from streamrl.rollout.sglang import router as r
from streamrl.rollout.sglang.launcher import spawn_sglang_engine, start_sglang_engines
from streamrl.rollout.sglang.router import remove_worker
from streamrl.train.backend import make_trainer

# Quiet, offline, deterministic-ish defaults for every process we start.
_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


logger = logging.getLogger("streamrl.launch")

_MPS: Any = None  # the job's MPS daemon (--use-mps), stopped by shutdown()


def init_ray(args: argparse.Namespace) -> None:

    global _MPS
    os.environ.update(_ENV)
    if ray.is_initialized():
        return
    env = dict(_ENV)
    if args.use_mps and _MPS is None:  # before any process of the job opens a CUDA context

        _MPS = MpsDaemon()
        os.environ.update(_MPS.env)
        env.update(_MPS.env)
    if args.ray_address:
        ray.init(address=args.ray_address, runtime_env={"env_vars": env})
    else:  # a private local cluster: GCS, raylet, agents and workers listen on loopback only, not on every interface
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True,
                 num_cpus=max(4, os.cpu_count() or 1), _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
        _quiet_ray_console()
    _link_ray_logs(args.run_dir)


# Lines Ray's processes print that say nothing to a streamrl user: without ray[default] no metrics agent runs, so
# every Ray process reports once, ~30 s in, that it cannot reach it (in colour, amid the status lines).
_NOISE = ("metrics exporter agent", "event+metrics exporter agent")


def _quiet_ray_console() -> None:
    """Drop `_NOISE` from the worker output Ray forwards to this console (it stays in the run's ray_logs/)."""
    from ray._private import worker as ray_worker  # the forwarding handler has no public hook

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    ignore_prefix = ray_worker.global_worker.job_logging_config is not None

    def forward(data: dict) -> None:
        lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in _NOISE)]
        if lines:
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # log_to_driver is on
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", forward)


def _link_ray_logs(run_dir: str | None) -> None:
    """`<run dir>/ray_logs` -> this Ray session's log directory (raylet, GCS, every worker's stdout/stderr)."""
    from ray._private.worker import _global_node  # the session directory has no public accessor

    if not run_dir or _global_node is None:
        return
    link = os.path.join(run_dir, "ray_logs")
    os.makedirs(run_dir, exist_ok=True)
    if os.path.islink(link):
        os.remove(link)
    if not os.path.exists(link):
        os.symlink(_global_node.get_logs_dir_path(), link)


@dataclass
class Components:
    engines: list[Any]
    engine_urls: list[str]  # every worker: abort, pause, continue and weight sync go here
    buffer: Any
    manager: Any
    trainer: Any
    router: Any = None  # the RouterProcess streamrl started (router_mode "local")
    router_url: str | None = None  # where /generate goes (None: straight to the engines)
    pool: Any = None  # EnginePool over `engines` / `engine_urls`: dead engines leave them, replacements join


def engine_spawner(args: argparse.Namespace) -> Any:
    """`spawn(index) -> (engine actor, ref of its URL once it serves)`: the engines at start, and replacements."""
    if args.rollout_engine == "sglang":

        return lambda index: spawn_sglang_engine(args, index)

    engine_gpus, _ = gpu_shares(args)
    cls = make_engine_actor(num_cpus=0, num_gpus=engine_gpus)
    env = {"env_vars": {"OMP_NUM_THREADS": str(args.engine_torch_threads)}}
    if args.engine_mps_thread_percentage:  # the engines' share of the SMs under MPS
        env["env_vars"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(args.engine_mps_thread_percentage)
    gpu = engine_gpus > 0

    def spawn(index: int) -> tuple[Any, Any]:
        engine = cls.options(runtime_env=env).remote(
            args.hf_checkpoint, torch_threads=args.engine_torch_threads, device="cuda" if gpu else "cpu",
            max_running_requests=args.sglang_server_concurrency,
            dtype=args.engine_dtype or ("bfloat16" if gpu else "float32"),
            max_context_len=args.engine_max_context_len,
            mem_fraction_static=args.sglang_mem_fraction_static,
            max_prefill_tokens=args.sglang_max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS,
            keep_kv_on_update=args.engine_keep_kv_on_update,
            num_continuous_decode_steps=args.sglang_num_continuous_decode_steps or 1)
        return engine, engine.url.remote()

    return spawn


def start_engines(args: argparse.Namespace) -> tuple[list[Any], list[str]]:

    if args.rollout_engine == "sglang":

        return start_sglang_engines(args)
    spawn = engine_spawner(args)
    started = [spawn(i) for i in range(args.rollout_num_engines)]
    return [e for e, _ in started], ray.get([ref for _, ref in started])


def start_router(args: argparse.Namespace, urls: list[str]) -> tuple[Any, str | None]:
    """(RouterProcess or None, router URL or None) per `args.router_mode`; sets args.sglang_router_ip/port."""

    mode = args.router_mode
    if mode == "none":
        return None, None
    if mode == "external":
        url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
        for u in urls:
            r.add_worker(url, u, timeout=args.rollout_engine_startup_timeout)
        return None, url
    proc = r.start_router(args, urls, log_path=f"{args.run_dir}/router.log" if args.run_dir else None)
    # where the router listens, known only now: slime's launcher records it in args the same way, and plug-ins
    # (custom generate functions) read args.sglang_router_ip/port to reach it
    args.sglang_router_ip, args.sglang_router_port = proc.host, proc.port
    return proc, proc.url


def build(args: argparse.Namespace) -> Components:
    init_ray(args)
    engines, urls = start_engines(args)
    router, router_url = start_router(args, urls)
    buffer = make_buffer_actor(args)
    manager = ray.remote(num_cpus=0, max_concurrency=1000)(RolloutManager).remote(args, buffer, urls, router_url)
    trainer = None if args.debug_rollout_only else make_trainer(args)  # slime's --debug-rollout-only: none
    ray.get(manager.get_stats.remote())  # surface constructor errors (bad data, bad plug-in path) now
    pool = EnginePool(args, engines, urls, manager, router_url, spawn=_replacements(args, len(engines)))
    return Components(engines, urls, buffer, manager, trainer, router, router_url, pool)


def _replacements(args: argparse.Namespace, first_index: int) -> Any:
    """With --use-fault-tolerance: `() -> (actor, url ref)` starting the next replacement engine; else None."""
    if not args.use_fault_tolerance:
        return None
    spawn, index = engine_spawner(args), iter(range(first_index, 1 << 30))
    return lambda: spawn(next(index))


def shutdown(c: Components) -> list[str]:
    """Stop everything, best effort: each step runs whatever failed before it, and a failure (a dead actor, a
    router already gone) is logged on one line and returned, never raised. Called from a `finally`, raising here
    would put e.g. `ActorDiedError` last in the user's traceback, over the error that named the real culprit."""

    errors: list[str] = []

    def step(what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a fault boundary: recorded and logged, the rest still stops
            errors.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            logger.warning("shutdown: %s", errors[-1])

    step("manager close", lambda: ray.get(c.manager.close.remote(), timeout=10))
    if c.trainer is not None:
        step("trainer shutdown", c.trainer.shutdown)
    if c.router is not None:
        step("router stop", c.router.stop)
    elif c.router_url:  # an external router: leave it without our (soon dead) engines

        for u in c.engine_urls:
            step(f"router {c.router_url} remove worker {u}", lambda u=u: remove_worker(c.router_url, u, timeout=30))
    for i, e in enumerate(c.engines):
        step(f"engine {i} shutdown", lambda e=e: ray.get(e.shutdown.remote(), timeout=10))
        step(f"engine {i} kill", lambda e=e: ray.kill(e))
    step("manager kill", lambda: ray.kill(c.manager))
    step("buffer kill", lambda: ray.kill(c.buffer))
    global _MPS
    if _MPS is not None:  # every CUDA process of the job is gone by now
        step("MPS daemon stop", _MPS.stop)
        _MPS = None
    return errors
