"""Admission pacing owned by the buffer's ledger (slots given back, never taken twice; resume origins) and the
token ledger (generated = trained + discarded + carried), on the plain buffer class."""

from __future__ import annotations

import asyncio

import pytest
from buffer_helpers import group, make_args

from buffers import RolloutBuffer, admission_limit
from buffers.admission import Pacing
from buffers.tokens import TokenLedger, balance, group_tokens


def run(coro):
    return asyncio.run(coro)


# -- pacing ---------------------------------------------------------------------------------------------------------
def test_pacing_origin_zero_is_the_plain_bound():
    for v, k, n, b in [(0, 1, 2, 4), (3, 0, 1, 8), (2, 2, 3, 1)]:
        assert Pacing(k, n, b).limit(v) == admission_limit(v, k, n, b)


@pytest.mark.parametrize("K,N,B,s0,v0", [(1, 3, 2, 20, 7), (0, 1, 4, 5, 5), (2, 2, 1, 7, 4), (4, 4, 3, 10, 3)])
def test_pacing_from_an_origin_bounds_fifo_staleness(K, N, B, s0, v0):
    # After a resume at step s0 published as v0, the loop publishes after steps j with (j + 1) % N == 0, so step s
    # trains at version v0 + s // N - s0 // N. Admit each group at the lowest version pacing allows: FIFO puts group
    # a' (since the origin) in step s0 + a' // B; its staleness must stay within K, and reach it (tight).
    p = Pacing(K, N, B, origin_step=s0, origin_version=v0, origin_trained=123)
    worst = 0
    for a in range(200):
        v_admit = next(v for v in range(v0, 1000) if p.room(v, trained=123, outstanding=a) > 0)
        s = s0 + a // B
        worst = max(worst, v0 + s // N - s0 // N - v_admit)
    assert worst == K


def test_pacing_by_hand():
    p = Pacing(1, 3, 2, origin_step=20, origin_version=7, origin_trained=40)
    # steps 20..23 train at versions 7, 8, 8, 8 (publishes after steps 20 and 23): 4 steps = 8 groups at v7
    assert p.limit(7) == 8 and p.limit(8) == 14 and p.limit(3) == 8  # a version below the origin counts as v0
    assert p.used(trained=43, outstanding=4) == 7 and p.room(7, trained=43, outstanding=4) == 1
    assert p.room(7, trained=43, outstanding=9) == 0


def test_regenerated_group_keeps_its_slot_and_dropped_or_failed_give_it_back():
    async def main():
        buf = RolloutBuffer(make_args(max_staleness=0, stale_policy="regenerate", async_buffer_size=8,
                                      global_batch_size=2, n_samples_per_prompt=2))  # B = 1, N = 1, K = 0
        assert buf.admission_room() == 1  # (0 + 0 + 1) * 1 * 1
        buf.admit(["a"])
        assert buf.admission_room() == 0
        await buf.put([group("a", 0)])
        buf.set_version(1)  # "a" (v0) is now stale at K = 0: sent back to regenerate
        assert buf.admission_room() == 1 - 1 + 1  # limit 2, used 1 (a, outstanding)
        buf.admit(["b"])
        with pytest.raises(TimeoutError):
            await buf.get(1, step=1, timeout=0.05)  # retires "a" as stale; nothing fresh is queued
        assert buf.ledger.state("a") == "regenerating" and buf.admission_room() == 0
        [g] = buf.take_regenerate(4)
        assert buf.admission_room() == 0  # back in flight: still one slot, not two
        assert g[0].discarded_tokens == {"stale_regenerate": 2} and g[0].response_length == 0
        buf.mark("b", "failed", "reward", tokens=(3, {"abort_restart": 1}))
        assert buf.admission_room() == 1  # the failed group gave its slot back
        assert buf.slots() == {"used": 1, "limit": 2, "outstanding": 1, "room": 1}
        assert buf.tokens.to_dict() == {"trained": 0, "discarded": {"failed": 3, "abort_restart": 1}}
        with pytest.raises(ValueError, match="needs its tokens"):
            buf.admit(["c"]) or buf.mark("c", "filtered", "zero_std")

    run(main())


def test_pacing_origin_after_load_follows_new_flags():
    async def main():
        buf = RolloutBuffer(make_args(global_batch_size=4, async_buffer_size=8))  # B = 2
        buf.admit(["a", "b", "c"])
        await buf.put([group("a"), group("b"), group("c")])
        await buf.get(2, step=0)
        sd = buf.state_dict()
        new = RolloutBuffer(make_args(global_batch_size=2, async_buffer_size=8, max_staleness=0))  # B = 1, K = 0
        await new.load_state_dict(sd)
        new.set_pacing_origin(step=1, version=1)
        # one queued group (c) is outstanding; at K = 0, N = 1, B = 1 a step's worth (1) may be ahead: no room
        assert new.slots() == {"used": 1, "limit": 1, "outstanding": 1, "room": 0}
        new.set_version(2)
        assert new.admission_room() == 1
        other = RolloutBuffer(make_args(n_samples_per_prompt=4, global_batch_size=8))
        with pytest.raises(ValueError, match="--n-samples-per-prompt 2"):
            await other.load_state_dict(sd)

    run(main())


# -- tokens -----------------------------------------------------------------------------------------------------------
def test_token_ledger_settles_by_reason_and_balances():
    led = TokenLedger()
    led.settle(10, {"abort_restart": 4}, "trained")
    led.settle(6, {}, "filtered")
    led.settle(0, {"stale_regenerate": 5}, "dropped_stale")
    assert led.to_dict() == {"trained": 10, "discarded": {"abort_restart": 4, "filtered": 6, "stale_regenerate": 5}}
    assert led.wasted == 15 and TokenLedger.from_dict(led.to_dict()).to_dict() == led.to_dict()
    out = balance(32, led.to_dict(), {"queued": 7, "in_flight": 0})
    assert out["balanced"] and out["accounted"] == 32 and out["wasted"] == 15
    assert not balance(33, led.to_dict(), {"queued": 7})["balanced"]  # a lost token shows


def test_buffer_settles_trained_and_stale_dropped_tokens():
    async def main():
        buf = RolloutBuffer(make_args(max_staleness=0, async_buffer_size=8, global_batch_size=2))
        buf.admit(["a", "b"])
        g = group("a", 0, response=3)  # 2 samples x 3 tokens
        g[0].discarded_tokens["abort_restart"] = 2
        await buf.put([g, group("b", 0)])
        assert buf.carried_tokens() == {"queued": 6 + 2 + 4, "partial": 0, "regenerating": 0}
        await buf.get(1, step=0)
        buf.set_version(1)
        with pytest.raises(TimeoutError):
            await buf.get(1, step=1, timeout=0.05)  # "b" is stale: dropped
        assert buf.token_ledger() == {"trained": 6, "discarded": {"abort_restart": 2, "dropped_stale": 4},
                                      "carried": {"queued": 0, "partial": 0, "regenerating": 0}}
        assert group_tokens(g) == (6, {"abort_restart": 2})

    run(main())
