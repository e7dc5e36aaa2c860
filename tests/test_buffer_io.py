"""Buffer I/O: wire format, encoded path, token budget, save/load, stats, shutdown and concurrent producers."""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest
from buffer_helpers import group, ids, make_args

from buffers import BufferClosed, RolloutBuffer, decode_batch, encode_batch, meta_of
from buffers.persist import atomic_write, read_state
from streamrl.types import decode_groups, encode
from streamrl.wire import GroupMeta, join_groups, parse_batch


def run(coro):
    return asyncio.run(coro)


# -- wire ---------------------------------------------------------------------------------------------------------
def test_meta_and_both_input_forms_agree():
    gs = [group("a", [0, 3], rewards=[1.0, 0.0]), group("b", 2, response=0), group("c", [5, 5], n=2, prompt=40)]
    gs[0][1].append_response_tokens(tokens=[1], log_probs=[-1.0], version=1)  # versions 3, 3, 1
    gs[2][0].discarded_tokens.update(stale_regenerate=7, abort_restart=1)  # the token ledger's history
    gs[2][1].discarded_tokens.update(stale_regenerate=2)
    expect = [GroupMeta("a", 2, 0, 3, 11, [1.0, 0.0], resp=5), GroupMeta("b", 2, None, None, 6, [None, None]),
              GroupMeta("c", 2, 5, 5, 84, [None, None], resp=4, discarded={"stale_regenerate": 9, "abort_restart": 1})]
    assert [meta_of(g) for g in gs] == expect
    fast, plain = parse_batch(encode_batch(gs)), parse_batch(encode(gs))
    assert [m for m, _ in fast] == [m for m, _ in plain] == expect
    assert [r for _, r in fast] == [r for _, r in plain] == [encode(g) for g in gs]
    assert join_groups([r for _, r in fast]) == encode(gs) and decode_batch(encode(gs)) == gs
    assert join_groups([]) == encode([]) and parse_batch(encode_batch([])) == []
    many = [group(f"g{i}") for i in range(70000 // 40)]  # array16 header
    assert decode_groups(join_groups([encode(g) for g in many])) == many
    mixed = group("m", 0)
    mixed[1].group_id = "other"
    assert meta_of(mixed).gid == ""


def test_put_encoded_get_encoded_roundtrip_and_validation():
    async def main():
        buf = RolloutBuffer(make_args(async_buffer_size=8))
        assert await buf.put_encoded(encode_batch([group("a", 0), group("b", 1)])) == 2
        assert await buf.put_encoded(encode([group("c", 1)])) == 1  # the plain form works too
        await buf.put([group("d", 1)])
        assert ids(decode_groups(await buf.get_encoded(2, step=0))) == ["a", "b"]
        got = await buf.get(2, step=1)
        assert ids(got) == ["c", "d"] and got[0] == group("c", 1)
        with pytest.raises(ValueError, match="has 3 samples"):
            await buf.put_encoded(encode_batch([group("x", n=3)]))
        bad = group("y")
        bad[1].group_id = "z"
        with pytest.raises(ValueError, match="same non-empty group_id"):
            await buf.put_encoded(encode([bad]))
        with pytest.raises(ValueError, match="twice in one put"):
            await buf.put_encoded(encode_batch([group("q"), group("q")]))
        with pytest.raises(msgspec.ValidationError):
            await buf.put_encoded(msgspec.msgpack.encode({"type": "nope"}))
        assert buf.check_ledger()["trained"] == 4 and buf.size() == 0

    run(main())


# -- token budget -------------------------------------------------------------------------------------------------
def test_token_budget_blocks_and_yields_to_a_waiting_trainer():
    async def main():
        buf = RolloutBuffer(make_args(async_buffer_size=8, async_buffer_max_tokens=25))  # a group: 2 x 5 tokens
        await buf.put([group("a"), group("b")])
        assert buf.stats()["tokens"] == 20
        with pytest.raises(TimeoutError, match="0 of 1"):
            await buf.put([group("c")], timeout=0.05)
        big = group("big", prompt=30)  # 64 tokens: more than the whole budget
        await buf.get(2, step=0)
        await buf.put([big])  # alone in an empty buffer: allowed (it could never go in otherwise)
        getter = asyncio.create_task(buf.get(3, step=1))
        await asyncio.sleep(0.01)
        # the trainer waits for 3 groups: the token bound yields so that its batch can form
        await asyncio.wait_for(buf.put([group("c"), group("d")]), 1)
        assert ids(await asyncio.wait_for(getter, 1)) == ["big", "c", "d"]
        s = buf.stats()
        assert (s["tokens"], s["tokens_put"], s["max_tokens"]) == (0, 104, 25) and s["put_blocked_s"] > 0

    run(main())


# -- persistence --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filt", [None, "prioritized", "lifo"])
def test_save_load_roundtrip_restores_identical_gets(tmp_path, filt):
    async def main():
        args = make_args(async_buffer_size=8, stale_policy="regenerate", max_staleness=0, max_reuse=2,
                         buffer_filter_path=filt)
        a = RolloutBuffer(args)
        a.admit(["flying", "cut"])
        a.stash_partials([group("cut")])
        await a.put([group("s0", 0), group("q0", 1, rewards=[1, 0])])
        a.set_version(1)
        with pytest.raises(TimeoutError):  # takes both: s0 is stale (regenerated), q0 goes back in front
            await a.get(2, step=0, timeout=0.05)
        assert a.stats()["requeues"] == {"staleness=1": 1} and ids(a.groups) == ["q0"]
        await a.put_encoded(encode_batch([group(f"q{i}", 1, rewards=[i % 2, 0]) for i in range(1, 4)]))
        await a.put([group("q4", [1, 1])])
        assert len(await a.get(1, step=0)) == 1
        path = tmp_path / "sub" / "buffer.msgpack"
        assert a.save(path) == str(path) and os.listdir(path.parent) == ["buffer.msgpack"]  # no temp file left
        b = RolloutBuffer(args)
        counts = await b.load(path)
        assert counts == {**dict.fromkeys(counts, 0), "in_flight": 1, "partial": 1, "queued": 4, "regenerating": 1,
                          "trained": 1}
        for k in ("size", "tokens", "version", "ledger", "reasons", "admitted", "groups_got", "groups_put",
                  "regenerate_pending", "partials", "replay_size", "staleness_hist", "requeues"):
            assert a.stats()[k] == b.stats()[k], k
        for step, n in ((1, 2), (2, 3)):  # 2 fresh, then 2 fresh + 1 reused
            ga, gb = await a.get(n, step=step), await b.get(n, step=step)
            assert ga == gb and len(gb) == n  # Structs compare by value: identical groups, same order
        [regen] = b.take_regenerate(5)
        assert ids([regen]) == ["s0"] and regen[0].response_length == 0 and ids(b.take_partials(5)) == ["cut"]
        assert b.check_ledger()["in_flight"] == 3

    run(main())


def test_partial_stash_guards():
    async def main():
        buf = RolloutBuffer(make_args())
        buf.admit(["a", "b"])
        buf.mark("b", "partial", reason="aborted")
        buf.stash_partials([group("a"), group("b")])
        with pytest.raises(ValueError, match="already stashed"):
            buf.stash_partials([group("a")])
        with pytest.raises(ValueError, match="take_partials"):
            await buf.put([group("a")])
        with pytest.raises(ValueError, match="in the buffer"):
            buf.mark("b", "failed", reason="x", tokens=(0, {}))
        assert ids(buf.take_partials(1)) == ["a"] and buf.ledger.state("a") == "in_flight"
        await buf.put([group("a")])
        assert buf.check_ledger()["partial"] == 1 and buf.stats()["reasons"] == {"partial/aborted": 1,
                                                                                 "partial/stopped": 1}

    run(main())


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "state"
    atomic_write(p, b"old")

    with pytest.raises(TypeError):
        atomic_write(p, object())  # the write fails midway
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["state"]  # old file intact, no temp file left
    atomic_write(p, msgspec.msgpack.encode([1]))
    with pytest.raises(ValueError, match="not a rollout buffer checkpoint"):
        read_state(p)


def test_old_state_dict_format_still_loads():
    async def main():
        old = {"groups": encode([group("a")]), "regenerate": encode([]), "version": 3,
               "ledger": {"state": {"a": "queued", "b": "trained"}, "step": {"b": 0}, "reason": {}, "reasons": {}},
               "metrics": {"put": 2, "got": 1, "put_blocked_s": 0.5, "get_wait_s": 0.25}}
        buf = RolloutBuffer(make_args(max_staleness=3))
        await buf.load_state_dict(old)
        s = buf.stats()
        assert (s["size"], s["version"], s["groups_put"], s["groups_got"], s["put_blocked_s"]) == (1, 3, 2, 1, 0.5)
        assert ids(await buf.get(1, step=1, timeout=5)) == ["a"] and buf.stats()["staleness_hist"] == {3: 1}

    run(main())


# -- stats --------------------------------------------------------------------------------------------------------
def test_stats_values():
    async def main():
        buf = RolloutBuffer(make_args(async_buffer_size=5, max_staleness=1, stale_policy="drop"))
        await buf.put([group("a", 0), group("b", 1), group("c", 2), group("d", 2)])
        buf.set_version(2)
        assert ids(await buf.get(2, step=0)) == ["b", "c"]  # a: staleness 2, dropped
        s = buf.stats()
        assert (s["size"], s["capacity"], s["fill"], s["tokens"]) == (1, 5, 0.2, 10)
        assert (s["groups_put"], s["samples_put"], s["groups_got"], s["samples_got"]) == (4, 8, 2, 4)
        assert s["staleness_hist"] == {0: 1, 1: 1} and (s["staleness_mean"], s["staleness_max"]) == (0.5, 1)
        assert s["drops"] == {"staleness=2": 1} and s["requeues"] == {}
        assert s["put_groups_per_s"] > 0 and s["get_samples_per_s"] > 0
        assert s["ledger"]["dropped_stale"] == 1 and s["closed"] is False

    run(main())


# -- shutdown and concurrency -------------------------------------------------------------------------------------
def test_producer_dying_mid_put_leaves_a_consistent_buffer():
    async def main():
        buf = RolloutBuffer(make_args(async_buffer_size=2))
        buf.admit(["p0", "p1", "p2"])
        producer = asyncio.create_task(buf.put([group("p0"), group("p1"), group("p2")]))
        await asyncio.sleep(0.01)
        assert buf.size() == 2 and not producer.done()  # blocked on p2
        producer.cancel()  # the producer dies mid-put
        with pytest.raises(asyncio.CancelledError):
            await producer
        counts = buf.check_ledger()
        assert (counts["queued"], counts["in_flight"]) == (2, 1)  # p2 never reached the buffer
        getter = asyncio.create_task(buf.get(2, step=0))
        assert ids(await asyncio.wait_for(getter, 1)) == ["p0", "p1"]
        trainer = asyncio.create_task(buf.get(1, step=1))  # blocks: nothing left
        blocked_put = asyncio.create_task(buf.put([group("x"), group("y"), group("z"), group("w")]))
        await asyncio.sleep(0.01)
        assert ids(await asyncio.wait_for(trainer, 1)) == ["x"]
        await buf.close()
        with pytest.raises(BufferClosed, match="3 of 4"):
            await asyncio.wait_for(blocked_put, 1)
        assert ids(await buf.get(2, step=2)) == ["y", "z"]  # a closed buffer drains
        with pytest.raises(BufferClosed):
            await asyncio.wait_for(buf.get(1, step=3), 1)
        assert buf.check_ledger()["trained"] == 5

    run(main())


def test_trainer_cancelled_mid_get_puts_groups_back():
    async def main():
        buf = RolloutBuffer(make_args())
        await buf.put([group("a")])
        getter = asyncio.create_task(buf.get(2, step=0))
        await asyncio.sleep(0.01)
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter
        assert ids(buf.groups) == ["a"] and buf.check_ledger()["queued"] == 1
        await buf.put([group("b")])
        assert ids(await buf.get(2, step=0)) == ["a", "b"]

    run(main())


def test_get_holding_fresh_groups_cancelled_or_aged_while_waiting():
    async def main():
        buf = RolloutBuffer(make_args(max_staleness=0, stale_policy="drop"))
        buf.set_version(1)
        await buf.put([group("stale", 0), group("fresh", 1)])
        getter = asyncio.create_task(buf.get(2, step=0))  # drops "stale", holds "fresh", waits for one more
        await asyncio.sleep(0.01)
        assert buf.size() == 1 and buf.groups == []  # held: still queued and counted
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter
        assert ids(buf.groups) == ["fresh"] and buf.check_ledger()["queued"] == 1
        await buf.put([group("stale2", 0)])
        getter = asyncio.create_task(buf.get(2, step=0))  # holds "fresh" again
        await asyncio.sleep(0.01)
        buf.set_version(2)  # a publish while the get waits: the held group is stale now
        await buf.put([group("new1", 2), group("new2", 2)])
        assert ids(await asyncio.wait_for(getter, 1)) == ["new1", "new2"]
        s = buf.stats()
        assert s["drops"] == {"staleness=1": 3} and s["staleness_hist"] == {0: 2}
        assert buf.ledger.state("fresh") == "dropped_stale" and buf.check_ledger()["trained"] == 2

    run(main())


def test_concurrent_producers_lose_nothing():
    async def main():
        buf = RolloutBuffer(make_args(async_buffer_size=3))

        async def producer(p: int) -> None:
            for i in range(10):
                await buf.put([group(f"p{p}-{i}")]) if i % 2 else await buf.put_encoded(encode_batch(
                    [group(f"p{p}-{i}")]))

        async def trainer() -> list[str]:
            out = []
            for step in range(20):
                out += ids(await buf.get(2, step=step))
            return out

        *_, got = await asyncio.wait_for(asyncio.gather(*(producer(p) for p in range(4)), trainer()), 10)
        assert sorted(got) == sorted(f"p{p}-{i}" for p in range(4) for i in range(10))
        for p in range(4):  # each producer's groups keep their order (FIFO)
            mine = [g for g in got if g.startswith(f"p{p}-")]
            assert mine == [f"p{p}-{i}" for i in range(10)]
        assert buf.check_ledger()["trained"] == 40 and buf.stats()["put_blocked_s"] > 0

    run(main())
