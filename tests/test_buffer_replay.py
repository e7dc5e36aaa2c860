"""Off-policy replay (`--max-reuse`): reuse only instead of waiting, counts, staleness, ledger, rollback, save/load."""

from __future__ import annotations

import asyncio

import pytest
from buffer_helpers import group, ids, make_args

from buffers import RolloutBuffer


def run(coro):
    return asyncio.run(coro)


def test_no_reuse_by_default():
    async def main():
        buf = RolloutBuffer(make_args())
        await buf.put([group("a"), group("b")])
        assert ids(await buf.get(2, step=0)) == ["a", "b"]
        with pytest.raises(TimeoutError):  # nothing fresh and no replay: the trainer waits
            await buf.get(1, step=1, timeout=0.05)
        s = buf.stats()
        assert (s["replay_size"], s["reused"], s["reuse_counts"]) == (0, 0, {1: 2})

    run(main())


def test_reuse_fills_instead_of_waiting_up_to_max_reuse():
    async def main():
        buf = RolloutBuffer(make_args(max_reuse=3, max_staleness=5))
        await buf.put([group("a"), group("b")])
        assert ids(await buf.get(2, step=0)) == ["a", "b"]
        await buf.put([group("c")])
        # fresh first (c), then the least used, earliest trained (a)
        assert ids(await buf.get(2, step=1)) == ["c", "a"]
        assert ids(await buf.get(2, step=2)) == ["b", "c"]  # uses: a 2, b 1, c 1 -> b, then c (trained later)
        assert ids(await buf.get(3, step=3)) == ["a", "b", "c"]  # every one now reaches 3 uses
        with pytest.raises(TimeoutError):  # all used up: wait for fresh
            await buf.get(1, step=4, timeout=0.05)
        assert [buf.ledger.uses(g) for g in "abc"] == [3, 3, 3]
        assert buf.ledger.step("a") == 0 and buf.ledger.step("c") == 1  # the step of the first training
        counts = buf.check_ledger()
        assert counts["trained"] == 3 and buf.ledger.admitted == 3  # a reused group is not a new group
        s = buf.stats()
        assert (s["reused"], s["reuse_counts"], s["groups_got"], s["reused_got"]) == (6, {3: 3}, 9, 6)
        assert s["replay_evicted"] == {"used_up": 3} and s["replay_size"] == 0

    run(main())


def test_fresh_groups_are_never_displaced_by_replay():
    async def main():
        buf = RolloutBuffer(make_args(max_reuse=5, async_buffer_size=4))
        await buf.put([group("a")])
        await buf.get(1, step=0)
        await buf.put([group("b"), group("c")])
        assert ids(await buf.get(2, step=1)) == ["b", "c"]  # enough fresh: no reuse
        assert buf.stats()["reused"] == 0

    run(main())


def test_replay_respects_staleness_and_hands_out_fresh_copies():
    async def main():
        buf = RolloutBuffer(make_args(max_reuse=4, max_staleness=1))
        buf.set_version(1)
        await buf.put([group("v0", 0), group("v1", 1)])
        await buf.get(2, step=0)
        buf.set_version(2)  # v0 now has staleness 2 > 1: evicted; v1 has 1: still eligible
        first = await buf.get(1, step=1)
        assert ids(first) == ["v1"]
        first[0][0].tokens.append(99)  # a trainer mutating its batch must not change later reuses
        again = await buf.get(1, step=2)
        assert again[0][0].tokens == [1, 2, 3, 7, 8] and again[0][0] is not first[0][0]
        s = buf.stats()
        assert s["replay_evicted"] == {"stale": 1} and s["staleness_hist"] == {0: 1, 1: 3}
        assert buf.ledger.uses("v1") == 3 and buf.ledger.uses("v0") == 1
        buf.set_version(3)
        with pytest.raises(TimeoutError):
            await buf.get(1, step=3, timeout=0.05)

    run(main())


def test_replay_tops_up_a_partial_fresh_batch_and_encoded_path():
    async def main():
        buf = RolloutBuffer(make_args(max_reuse=2, async_buffer_size=4))
        await buf.put([group("a"), group("b")])
        await buf.get(2, step=0)
        await buf.put([group("c")])
        from buffers import decode_batch

        got = decode_batch(await buf.get_encoded(3, step=1))
        assert ids(got) == ["c", "a", "b"]
        assert buf.check_ledger()["trained"] == 3 and buf.stats()["reuse_counts"] == {1: 1, 2: 2}

    run(main())


def test_replay_capacity_evicts_the_earliest_trained():
    async def main():
        buf = RolloutBuffer(make_args(max_reuse=9, async_buffer_size=2))
        for i in range(3):
            await buf.put([group(f"g{i}")])
            await buf.get(1, step=i)
        assert buf._replay.gids() == ["g1", "g2"] and buf.stats()["replay_evicted"] == {"capacity": 1}

    run(main())


def test_replay_survives_save_load(tmp_path):
    async def main():
        a = RolloutBuffer(make_args(max_reuse=3))
        await a.put([group("a"), group("b")])
        await a.get(2, step=0)
        await a.get(1, step=1)  # a: 2 uses
        a.save(tmp_path / "buf")
        b = RolloutBuffer(make_args(max_reuse=3))
        await b.load(tmp_path / "buf")
        assert b.stats()["reuse_counts"] == a.stats()["reuse_counts"] == {1: 1, 2: 1}
        for step in (2, 3):
            assert ids(await a.get(1, step=step)) == ids(await b.get(1, step=step))
        assert b.ledger.uses("a") == a.ledger.uses("a") == 3 and b.ledger.uses("b") == 2
        b.check_ledger()

    run(main())
