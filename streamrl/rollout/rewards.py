"""Reward functions: slime's `--custom-rm-path` contract `async def rm(args, sample) -> float`, and built-ins.

`score_group` turns reward failures (an exception or `--rm-timeout`) into FAILED samples instead of errors.
Built-in `rule`: exact match against `sample.label` for the synthetic tasks (`streamrl.tasks`); the task comes from
`--rm-type` or the sample's `metadata["rm_type"]`.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Awaitable, Callable

import anyio

from streamrl.tasks import TASKS, exact_match_reward
from streamrl.types import Sample, Status

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


def load_group_reward_fn(args: argparse.Namespace) -> Callable[[argparse.Namespace, list[Sample]], Awaitable[list]]:
    """--group-rm: --custom-rm-path is `async def rm(args, samples) -> list[float]` (one call per group)."""
    from streamrl.plugins import load_function

    fn = load_function(args.custom_rm_path, what="--custom-rm-path (--group-rm)")

    async def call(a: argparse.Namespace, samples: list[Sample]) -> list:
        out = fn(a, samples)
        out = await out if inspect.isawaitable(out) else out
        if not isinstance(out, list | tuple) or len(out) != len(samples):
            raise TypeError(f"group reward returned {type(out).__name__} of length "
                            f"{len(out) if hasattr(out, '__len__') else '?'} for {len(samples)} samples")
        return list(out)

    return call


async def _timed(coro: Awaitable, timeout: float | None):
    if timeout is None:
        return await coro
    with anyio.fail_after(timeout):
        return await coro


def _fail(sample: Sample, error: str) -> None:
    sample.status = Status.FAILED
    sample.metadata["reward_error"] = error


async def score_group(args: argparse.Namespace, group: list[Sample], reward_fn: Callable | None,
                      group_fn: Callable | None = None) -> list[str]:
    """Set `reward` on every sample; returns the errors (empty when all succeeded).

    A reward call that raises or runs past `--rm-timeout` marks its sample FAILED with the error in
    `metadata["reward_error"]` (with --group-rm every sample of the group); the others keep their rewards. Samples
    that already carry a reward (set by a custom generate function) are not scored again.
    """
    timeout = getattr(args, "rm_timeout", None)
    todo = [s for s in group if s.reward is None]
    errors: list[str] = []

    def describe(e: BaseException) -> str:
        return f"reward timed out after {timeout}s" if isinstance(e, TimeoutError) else f"reward raised {e!r}"

    if group_fn is not None and todo:
        try:
            rewards = await _timed(group_fn(args, todo), timeout)
            for s, r in zip(todo, rewards, strict=True):
                s.reward = r
        except Exception as e:  # the user's function: recorded on the samples, never raised
            msg = describe(e)
            for s in todo:
                _fail(s, msg)
            errors.append(f"group {group[0].group_id}: {msg}")
        return errors

    async def one(s: Sample) -> None:
        try:
            s.reward = await _timed(reward_fn(args, s), timeout)
        except Exception as e:  # the user's function: recorded on the sample, never raised
            _fail(s, describe(e))
            errors.append(f"sample {s.index} ({s.group_id}): {describe(e)}")

    async with anyio.create_task_group() as tg:
        for s in todo:
            tg.start_soon(one, s)
    return errors
