"""Reward functions: slime's `--custom-rm-path` contract `async def rm(args, sample) -> float`, and built-ins.

`score_group` turns reward failures (an exception, `--rm-timeout`, or a value that is not a finite number: NaN
would poison the weights, None is not a score) into FAILED samples instead of errors. Synchronous reward functions
run in a worker thread, so a slow or blocking one never freezes the producers' event loop (and the timeout can
fire; the thread itself cannot be killed and finishes in the background).
Built-in `rule`: exact match against `sample.label` for the synthetic tasks (`streamrl.tasks`); the task comes from
`--rm-type` or the sample's `metadata["rm_type"]`. `remote_rm` (slime's): POST {prompt, response, label} to
`--rm-url`; the JSON answer is the reward. Connection errors, 429 and 5xx are retried with backoff (up to
REMOTE_RM_ATTEMPTS tries, within --rm-timeout); any other status fails the sample at once.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
from collections.abc import Awaitable, Callable

import anyio
import httpx

from streamrl.plugins import load_function
from streamrl.tasks import TASKS, exact_match_reward
from streamrl.types import Sample, Status

RewardFn = Callable[[argparse.Namespace, Sample], Awaitable[float] | float]


REMOTE_RM_ATTEMPTS = 10
REMOTE_RM_BACKOFF_S = 0.2  # doubled per retry, at most 8 s


async def remote_rm(args: argparse.Namespace, sample: Sample):
    """slime's remote reward: the server's JSON answer for {prompt, response, label}."""
    if not args.rm_url:
        raise ValueError(f"rm_type remote_rm (sample {sample.index}) needs --rm-url")
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    async with httpx.AsyncClient(timeout=args.rm_timeout) as client:
        for attempt in range(REMOTE_RM_ATTEMPTS):
            try:
                resp = await client.post(args.rm_url, json=payload)
                if resp.status_code != 429 and resp.status_code < 500:
                    resp.raise_for_status()  # a 4xx: the request itself is wrong, no retry
                    return resp.json()
                err: Exception = httpx.HTTPStatusError(f"{args.rm_url}: HTTP {resp.status_code}",
                                                       request=resp.request, response=resp)
            except httpx.TransportError as e:
                err = e
            if attempt + 1 == REMOTE_RM_ATTEMPTS:
                raise RuntimeError(f"--rm-url {args.rm_url}: no answer after {REMOTE_RM_ATTEMPTS} tries ({err})")
            await anyio.sleep(min(REMOTE_RM_BACKOFF_S * 2**attempt, 8.0))
    raise AssertionError("unreachable")


async def rule_reward(args: argparse.Namespace, sample: Sample) -> float:
    rm_type = args.rm_type or sample.metadata.get("rm_type")
    if rm_type == "remote_rm":
        return await remote_rm(args, sample)
    if rm_type not in TASKS and rm_type != "exact_match":
        raise ValueError(f"no rule reward for rm_type {rm_type!r} (sample {sample.index}); "
                         f"choose from {sorted(TASKS) + ['exact_match', 'remote_rm']} or pass --custom-rm-path")
    return exact_match_reward(sample.response, sample.label)


BUILTIN_REWARDS: dict[str, RewardFn] = {"rule": rule_reward, "exact_match": rule_reward, "remote_rm": remote_rm}


def load_reward_fn(args: argparse.Namespace) -> Callable[[argparse.Namespace, Sample], Awaitable[float]]:
    """The reward function named by --custom-rm-path (built-in name, module:function or file.py:function)."""

    fn = load_function(args.custom_rm_path or "rule", BUILTIN_REWARDS, what="--custom-rm-path")
    return functools.partial(_call, fn)


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


async def _call(fn: Callable, *args):
    """`fn(*args)`: awaited when async, else in a worker thread (abandoned if the caller's timeout fires)."""
    if _is_async(fn):
        out = fn(*args)
    else:
        out = await anyio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)
    return await out if inspect.isawaitable(out) else out


def check_reward(value, reward_key: str | None = None) -> str | None:
    """Why `value` cannot be trained on (None when it can): a finite int/float, or a dict whose `--reward-key`
    entry is one."""
    v = value
    if isinstance(value, dict):
        if reward_key is None or reward_key not in value:
            return f"reward is a dict without --reward-key {reward_key!r} (keys {sorted(value)[:5]})"
        v = value[reward_key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        return f"reward is {type(v).__name__} ({v!r:.40}), not a number"
    if not math.isfinite(v):
        return f"reward is {v}"
    return None


def load_group_reward_fn(args: argparse.Namespace) -> Callable[[argparse.Namespace, list[Sample]], Awaitable[list]]:
    """--group-rm: --custom-rm-path is `async def rm(args, samples) -> list[float]` (one call per group)."""

    fn = load_function(args.custom_rm_path, what="--custom-rm-path (--group-rm)")

    async def call(a: argparse.Namespace, samples: list[Sample]) -> list:
        out = await _call(fn, a, samples)
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
    timeout = args.rm_timeout
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
        for s in todo:
            bad = check_reward(s.reward, args.reward_key)
            if bad:
                _fail(s, bad)
                errors.append(f"sample {s.index} ({s.group_id}): {bad}")
        return errors

    async def one(s: Sample) -> None:
        try:
            s.reward = await _timed(reward_fn(args, s), timeout)
        except Exception as e:  # the user's function: recorded on the sample, never raised
            _fail(s, describe(e))
            errors.append(f"sample {s.index} ({s.group_id}): {describe(e)}")
            return
        bad = check_reward(s.reward, args.reward_key)
        if bad:
            _fail(s, bad)
            errors.append(f"sample {s.index} ({s.group_id}): {bad}")

    async with anyio.create_task_group() as tg:
        for s in todo:
            tg.start_soon(one, s)
    return errors
