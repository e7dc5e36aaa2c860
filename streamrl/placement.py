"""How the job's GPUs are shared between the engines and the trainer ranks (Ray resource requests)."""

from __future__ import annotations

import argparse

import ray


def gpu_shares(args: argparse.Namespace) -> tuple[float, float]:
    """(GPUs per engine, GPUs per trainer rank). With fewer GPUs than engines + ranks need (one GPU), or with
    --colocate, every process gets an equal fraction, so trainer and engines share the cards as separate
    processes."""

    total = ray.cluster_resources().get("GPU", 0)
    if total == 0:
        return 0.0, 0.0
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    need = args.rollout_num_engines * args.rollout_num_gpus_per_engine + world
    if need <= total and not args.colocate:
        return float(args.rollout_num_gpus_per_engine), 1.0
    frac = total / (args.rollout_num_engines + world)
    return frac, frac
