"""Buffer filters: the order of every built-in, prioritized sampling, and the same order inside the buffer."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from buffer_helpers import group, ids, make_args

from buffers import BUILTIN_FILTERS, RolloutBuffer, encode_batch, load_buffer_filter, meta_of, priority_scores
from buffers.filters import fifo, lifo, pop_first, prioritized


def five():  # max versions 2, 3, 1, 4, 2; min versions 2, 0, 1, 1, 2
    return [group("g0", 2), group("g1", [0, 3]), group("g2", 1), group("g3", [1, 4]), group("g4", 2)]


@pytest.mark.parametrize("name,k,taken,left", [
    ("fifo", 2, ["g0", "g1"], ["g2", "g3", "g4"]),
    ("pop_first", 5, ["g0", "g1", "g2", "g3", "g4"], []),
    ("lifo", 2, ["g4", "g3"], ["g0", "g1", "g2"]),
    ("lifo", 9, ["g4", "g3", "g2", "g1", "g0"], []),
    ("freshest_first", 3, ["g3", "g1", "g4"], ["g0", "g2"]),  # g0/g4 tie (2): the newer arrival first
    ("oldest_version_first", 3, ["g1", "g2", "g3"], ["g0", "g4"]),  # g2/g3 tie (1): the older arrival first
])
def test_builtin_order_and_pop(name, k, taken, left):
    b = five()
    assert ids(BUILTIN_FILTERS[name](None, 0, b, k)) == taken and ids(b) == left
    assert load_buffer_filter(name) is BUILTIN_FILTERS[name]


def test_aliases_and_unversioned_groups():
    assert fifo is pop_first and load_buffer_filter(None) is pop_first
    b = [group("old", 1), group("empty", 0, response=0), group("new", 2)]  # "empty" has no tokens: newest
    assert ids(BUILTIN_FILTERS["freshest_first"](None, 0, b, 1)) == ["empty"]
    b = [group("empty", 0, response=0), group("old", 1)]
    assert ids(BUILTIN_FILTERS["oldest_version_first"](None, 0, b, 2)) == ["old", "empty"]
    assert ids(lifo(None, 0, [], 3)) == []


def test_priority_scores_by_hand():
    metas = [meta_of(group("a", 1, n=4, rewards=[0, 0, 1, 1])),  # std 0.5, mean |r - 0.5| = 0.5
             meta_of(group("b", 3, n=4, rewards=[1, 1, 1, 1])),  # std 0
             meta_of(group("c", [2, 2, 2, 5], n=4, rewards=[0, 0, 0, 1]))]  # std sqrt(3)/4, mad 0.375
    np.testing.assert_allclose(priority_scores(metas, "reward_std"), [0.5, 0.0, np.sqrt(3) / 4])
    np.testing.assert_allclose(priority_scores(metas, "abs_advantage"), [0.5, 0.0, 0.375])
    np.testing.assert_allclose(priority_scores(metas, "recency"), [1.0, 3.0, 5.0])  # vmax - min(vmax) + 1
    dict_rewards = [meta_of(group("d", 0, rewards=[{"acc": 1.0}, {"acc": 0.0}]))]
    np.testing.assert_allclose(priority_scores(dict_rewards, "reward_std", reward_key="acc"), [0.5])
    with pytest.raises(ValueError, match="--reward-key"):
        priority_scores(dict_rewards)
    with pytest.raises(ValueError, match="unknown --buffer-priority"):
        priority_scores(metas, "loss")


def _bank():
    # r0 and r2 are informative (std 0.5); r1, r3 are all-equal rewards (std 0: GRPO learns nothing from them)
    return [group("r0", 0, rewards=[0, 1]), group("r1", 0, rewards=[1, 1]), group("r2", 0, rewards=[1, 0]),
            group("r3", 0, rewards=[0, 0])]


def test_prioritized_is_deterministic_and_pops_what_it_returns():
    args = make_args(seed=7)
    b1, b2 = _bank(), _bank()
    got1, got2 = prioritized(args, 5, b1, 2), prioritized(args, 5, b2, 2)
    assert ids(got1) == ids(got2) and len(got1) == 2
    assert sorted(ids(got1) + ids(b1)) == ["r0", "r1", "r2", "r3"]  # popped, nothing lost or duplicated
    runs = {tuple(ids(prioritized(make_args(seed=7), step, _bank(), 4))) for step in range(40)}
    assert len(runs) > 1  # the step changes the draw
    assert all(sorted(r) == ["r0", "r1", "r2", "r3"] for r in runs)  # k = all: a permutation
    assert ids(prioritized(args, None, _bank(), 0)) == []  # slime passes rollout_id=None


def test_prioritized_prefers_high_priority_groups():
    first = Counter(ids(prioritized(make_args(seed=s), step, _bank(), 2))[0] for s in range(5) for step in range(40))
    # priorities 0.5, 0.005, 0.5, 0.005: the zero-std groups get the 1% floor, so they come first ~1% of the time
    assert first["r0"] + first["r2"] >= 190 and first["r0"] > 60 and first["r2"] > 60
    recency = Counter(ids(prioritized(make_args(buffer_priority="recency"), s, [group("old", 0), group("new", 9)],
                                      1))[0] for s in range(200))
    assert recency["new"] > recency["old"] > 0  # weights 10 vs 1


def test_buffer_uses_the_same_order_on_encoded_groups():
    async def run(name: str, encoded: bool) -> list[str]:
        buf = RolloutBuffer(make_args(async_buffer_size=9, buffer_filter_path=name, max_staleness=9))
        await (buf.put_encoded(encode_batch(_bank() + five())) if encoded else buf.put(_bank() + five()))
        return ids(await buf.get(5, step=3)) + ids(await buf.get(4, step=4))

    for name in BUILTIN_FILTERS:
        direct = BUILTIN_FILTERS[name](make_args(), 3, _bank() + five(), 5)
        got = asyncio.run(run(name, encoded=True))
        assert got[:5] == ids(direct), name
        assert got == asyncio.run(run(name, encoded=False)), name
        assert sorted(got) == sorted(ids(_bank() + five())), name


def test_stateful_user_filter_state_is_saved(tmp_path):
    class Rotating:
        """A user filter with state: takes from the front, then the back, alternately."""

        __name__ = "rotating"

        def __init__(self):
            self.calls = 0

        def __call__(self, args, rollout_id, buffer, k):
            self.calls += 1
            return [buffer.pop(0 if self.calls % 2 else -1) for _ in range(min(k, len(buffer)))]

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, d):
            self.calls = d["calls"]

    async def main():
        a = RolloutBuffer(make_args(async_buffer_size=8))
        a._filter = Rotating()
        await a.put([group(f"g{i}") for i in range(6)])
        assert ids(await a.get(1, step=0)) == ["g0"]
        a.save(tmp_path / "b.msgpack")
        b = RolloutBuffer(make_args(async_buffer_size=8))
        b._filter = Rotating()
        await b.load(tmp_path / "b.msgpack")
        assert b._filter.calls == 1
        assert ids(await a.get(2, step=1)) == ids(await b.get(2, step=1)) == ["g5", "g4"]

    asyncio.run(main())
