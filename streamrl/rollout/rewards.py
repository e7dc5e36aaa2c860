"""Reward functions: slime's `--custom-rm-path` contract `async def rm(args, sample) -> float`, and built-ins.

Built-in `rule`: exact match against `sample.label` for the synthetic tasks (`streamrl.tasks`); the task comes from
`--rm-type` or the sample's `metadata["rm_type"]`.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Awaitable, Callable

from streamrl.tasks import TASKS, exact_match_reward
from streamrl.types import Sample

RewardFn = Callable[[argparse.Namespace, Sample], Awaitable[float] | float]


async def rule_reward(args: argparse.Namespace, sample: Sample) -> float:
    rm_type = args.rm_type or sample.metadata.get("rm_type")
    if rm_type not in TASKS and rm_type != "exact_match":
        raise ValueError(f"no rule reward for rm_type {rm_type!r} (sample {sample.index}); "
                         f"choose from {sorted(TASKS) + ['exact_match']} or pass --custom-rm-path")
    return exact_match_reward(sample.response, sample.label)


BUILTIN_REWARDS: dict[str, RewardFn] = {"rule": rule_reward, "exact_match": rule_reward}


def load_reward_fn(args: argparse.Namespace) -> Callable[[argparse.Namespace, Sample], Awaitable[float]]:
    """The reward function named by --custom-rm-path (built-in name, module:function or file.py:function)."""
    from streamrl.plugins import load_function

    fn = load_function(args.custom_rm_path or "rule", BUILTIN_REWARDS, what="--custom-rm-path")

    async def call(a: argparse.Namespace, sample: Sample) -> float:
        out = fn(a, sample)
        return await out if inspect.isawaitable(out) else out

    return call
