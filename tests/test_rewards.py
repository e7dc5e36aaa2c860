"""Reward calls: synchronous functions off the event loop (a timeout can fire), values checked to be finite
numbers (NaN, None, strings and bools are recorded failures, never trained on)."""

from __future__ import annotations

import math
import time

import anyio

from streamrl.config import default_args
from streamrl.rollout.rewards import check_reward, load_reward_fn, score_group
from streamrl.types import Sample, Status

P = "tests/plugins/rewards.py:"


def samples(**metas) -> list[Sample]:
    return [Sample(group_id="g", index=i, metadata=dict(m)) for i, m in enumerate(metas.values())]


def test_check_reward_by_hand():
    assert check_reward(1.0) is None and check_reward(0) is None and check_reward({"acc": 0.5}, "acc") is None
    assert check_reward(math.nan) == "reward is nan" and check_reward(-math.inf) == "reward is -inf"
    assert check_reward(None) == "reward is NoneType (None), not a number"
    assert check_reward("1") == "reward is str ('1'), not a number" and "bool" in check_reward(True)
    assert "without --reward-key" in check_reward({"acc": 1.0}) and "nan" in check_reward({"a": math.nan}, "a")


def test_bad_reward_values_fail_their_samples_only():
    args = default_args(custom_rm_path=P + "bad_value", rm_timeout=None)
    group = samples(a={"value": 1.0}, b={"value": float("nan")}, c={"value": None}, d={"value": 0.25})
    errors = anyio.run(score_group, args, group, load_reward_fn(args))
    assert [s.status for s in group] == [Status.PENDING, Status.FAILED, Status.FAILED, Status.PENDING]
    assert [s.reward for s in (group[0], group[3])] == [1.0, 0.25]
    assert group[1].metadata["reward_error"] == "reward is nan" and len(errors) == 2
    assert "NoneType" in group[2].metadata["reward_error"]


def test_blocking_sync_reward_leaves_the_loop_free_and_times_out():
    args = default_args(custom_rm_path=P + "blocking_sync", rm_timeout=0.3)
    group = samples(fast={"sleep": 0.0}, slow={"sleep": 3.0})
    ticks = []

    async def main():
        async def ticker():  # the event loop keeps running while the grader sleeps in its thread
            for _ in range(5):
                ticks.append(time.monotonic())
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            return await score_group(args, group, load_reward_fn(args))

    anyio.run(main)
    assert len(ticks) == 5 and group[0].reward == 1.0
    assert group[1].status == Status.FAILED and group[1].metadata["reward_error"] == "reward timed out after 0.3s"


def test_nonzero_std_filter_leaves_failed_samples_out():
    from streamrl.rollout.dynamic_filters import check_reward_nonzero_std

    args = default_args()
    ok = [Sample(reward=1.0), Sample(reward=0.0), Sample(status=Status.FAILED)]
    assert check_reward_nonzero_std(args, ok).keep  # std over 1.0 and 0.0; the failed one (reward None) is out
    same = [Sample(reward=1.0), Sample(reward=1.0), Sample(status=Status.FAILED)]
    assert check_reward_nonzero_std(args, same).reason == "zero_std_1.0"  # a failed one read as 0.0 would keep it
    lone = [Sample(reward=1.0), Sample(status=Status.FAILED)]
    assert check_reward_nonzero_std(args, lone).reason == "fewer_than_2_scored"
