"""Start the moving parts as Ray actors: engines, buffer, producers (RolloutManager), trainer ranks.

Ray starts a local cluster itself unless `--ray-address` is given. CPU counts are bookkeeping only on a laptop:
actors ask for 0 CPUs and each sets its own torch thread count (`--engine-torch-threads`, `--train-torch-threads`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

# Quiet, offline, deterministic-ish defaults for every process we start.
_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def init_ray(args: argparse.Namespace) -> None:
    import ray

    os.environ.update(_ENV)
    if ray.is_initialized():
        return
    if args.ray_address:
        ray.init(address=args.ray_address, runtime_env={"env_vars": _ENV})
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": _ENV}, log_to_driver=True,
                 num_cpus=max(4, os.cpu_count() or 1))


@dataclass
class Components:
    engines: list[Any]
    engine_urls: list[str]
    buffer: Any
    manager: Any
    trainer: Any


def start_engines(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    import ray

    from streamrl.rollout.engine.actor import make_engine_actor

    gpu = ray.cluster_resources().get("GPU", 0) > 0
    cls = make_engine_actor(num_cpus=0, num_gpus=args.rollout_num_gpus_per_engine if gpu else 0)
    env = {"env_vars": {"OMP_NUM_THREADS": str(args.engine_torch_threads)}}
    engines = [cls.options(runtime_env=env).remote(args.hf_checkpoint, torch_threads=args.engine_torch_threads,
                                                   device="cuda" if gpu else "cpu",
                                                   max_running_requests=args.sglang_server_concurrency)
               for _ in range(args.rollout_num_engines)]
    return engines, ray.get([e.url.remote() for e in engines])


def build(args: argparse.Namespace) -> Components:
    import ray

    from buffers.queue import make_buffer_actor
    from streamrl.rollout.manager import RolloutManager
    from streamrl.train.group import TrainerGroup

    init_ray(args)
    engines, urls = start_engines(args)
    buffer = make_buffer_actor(args)
    manager = ray.remote(num_cpus=0, max_concurrency=1000)(RolloutManager).remote(args, buffer, urls)
    trainer = TrainerGroup(args)
    ray.get(manager.get_stats.remote())  # surface constructor errors (bad data, bad plug-in path) now
    return Components(engines, urls, buffer, manager, trainer)


def shutdown(c: Components) -> None:
    import ray

    try:
        ray.get(c.manager.close.remote(), timeout=10)
    except Exception:  # the manager may already be gone; shutting down regardless
        pass
    c.trainer.shutdown()
    for e in c.engines:
        try:
            ray.get(e.shutdown.remote(), timeout=10)
        finally:
            ray.kill(e)
    ray.kill(c.manager)
    ray.kill(c.buffer)
