"""Real SGLang servers for `--rollout-engine sglang`: one `python -m sglang.launch_server` per engine, in a Ray actor.

    engines, urls = start_sglang_engines(args)     # rollout_num_engines actors, rollout_num_gpus_per_engine GPUs each

Each actor holds its GPUs (Ray sets CUDA_VISIBLE_DEVICES), picks free ports on its node, starts the server with the
flags streamrl owns (model path, tp size = --rollout-num-gpus-per-engine, host/port, nccl port, seed, weight
version 0) plus every `--sglang-<flag>` the user changed, and waits for `/health` for at most
`--rollout-engine-startup-timeout` seconds. A server that exits or never answers fails the launch with a
`LaunchError` that quotes its last log lines; the other engines are then stopped too.

`SGLangServer` is the process wrapper without Ray (tests start it with a fake server command on CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import ray

from streamrl.net import free_port
from streamrl.passthrough import to_cli
from streamrl.rollout.sglang.proc import LaunchError, ManagedProcess

DEFAULT_LAUNCH = [sys.executable, "-m", "sglang.launch_server"]


def server_command(args: argparse.Namespace, *, host: str, port: int, nccl_port: int,
                   launch: list[str] | None = None) -> list[str]:
    """argv of one SGLang server: streamrl-owned flags, then the changed `--sglang-*` passthrough flags."""

    argv = [*(launch or DEFAULT_LAUNCH), "--model-path", args.hf_checkpoint, "--host", host, "--port", str(port),
            "--tp-size", str(args.rollout_num_gpus_per_engine), "--nccl-port", str(nccl_port), "--base-gpu-id", "0",
            "--random-seed", str(args.seed), "--trust-remote-code"]
    # Producers read integer policy versions: start at "0" (SGLang's default is "default") unless the user chose.
    return argv + to_cli("sglang", args, defaults={"weight_version": "0"})


class SGLangServer(ManagedProcess):
    """One SGLang server process: `start()` then `wait_healthy()`; `url`; `stop()`."""

    def __init__(self, args: argparse.Namespace, *, host: str = "127.0.0.1", index: int = 0,
                 launch: list[str] | None = None, log_dir: str | Path | None = None):
        self.host = host
        self.port = free_port(host)
        nccl = free_port(host, avoid={self.port})
        log = Path(log_dir) / f"sglang-engine-{index}.log" if log_dir else None
        super().__init__(server_command(args, host=host, port=self.port, nccl_port=nccl, launch=launch),
                         f"SGLang engine {index} at {host}:{self.port}", log)
        self.timeout = args.rollout_engine_startup_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def wait_healthy(self, timeout: float | None = None) -> str:
        self.wait_ready(self.url + "/health", timeout or self.timeout)
        return self.url


class SGLangEngineActor:
    """Ray actor body: one SGLang server on this actor's GPUs. Decorate with `ray.remote(num_gpus=...)`."""

    def __init__(self, args: argparse.Namespace, index: int = 0, launch: list[str] | None = None,
                 log_dir: str | None = None):

        host = ray.util.get_node_ip_address()  # reachable from the router and trainers on other nodes
        self.server = SGLangServer(args, host=host, index=index, launch=launch, log_dir=log_dir)

    def start(self) -> str:
        self.server.start()
        return self.server.wait_healthy()

    def url(self) -> str:
        return self.server.url

    def log_tail(self, n: int = 30) -> str:
        return self.server.tail(n)

    def shutdown(self) -> None:
        self.server.stop()


def spawn_sglang_engine(args: argparse.Namespace, index: int, launch: list[str] | None = None) -> tuple[Any, Any]:
    """One more SGLang engine actor (a replacement for a dead one): (actor, ref of its URL once healthy)."""

    log_dir = args.run_dir
    cls = ray.remote(num_gpus=args.rollout_num_gpus_per_engine, num_cpus=0)(SGLangEngineActor)
    actor = cls.remote(args, index, launch, f"{log_dir}/engines" if log_dir else None)
    return actor, actor.start.remote()


def start_sglang_engines(args: argparse.Namespace, launch: list[str] | None = None) -> tuple[list[Any], list[str]]:
    """Start `args.rollout_num_engines` SGLang servers as Ray actors; returns (actors, URLs) once all are healthy."""

    per, n = args.rollout_num_gpus_per_engine, args.rollout_num_engines
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < per * n:
        raise LaunchError(f"--rollout-engine sglang needs {n} engines x {per} GPUs (--rollout-num-gpus, "
                          f"--rollout-num-gpus-per-engine) but the Ray cluster has {gpus:g} GPUs")
    log_dir = args.run_dir
    cls = ray.remote(num_gpus=per, num_cpus=0)(SGLangEngineActor)
    actors = [cls.remote(args, i, launch, f"{log_dir}/engines" if log_dir else None) for i in range(n)]
    try:
        urls = ray.get([a.start.remote() for a in actors])
    except ray.exceptions.RayTaskError as e:
        for a in actors:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # best effort: the failing engine may be gone already
                pass
            ray.kill(a)
        cause = e.cause if isinstance(getattr(e, "cause", None), LaunchError) else e
        raise LaunchError(f"SGLang engines failed to start:\n{cause}") from None
    return actors, urls
