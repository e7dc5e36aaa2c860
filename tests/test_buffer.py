"""Buffer: ledger, admission pacing, filters and the plug-in loader (the Ray actor: test_buffer_ray.py)."""

from __future__ import annotations

import asyncio

import pytest
from buffer_helpers import group, ids, make_args

from buffers import (
    Ledger,
    LedgerError,
    RolloutBuffer,
    admission_limit,
    freshest_first,
    groups_per_step,
    load_buffer_filter,
    may_admit,
    oldest_version_first,
    pop_first,
)
from streamrl.plugins import load_function


# -- ledger ------------------------------------------------------------------------------------------------------
def test_ledger_transitions_counts_reasons_and_roundtrip():
    led = Ledger()
    for g in "abcdef":
        led.admit(g)
    led.move("a", "queued")
    led.move("a", "trained", step=3)
    led.move("b", "partial")
    led.move("b", "in_flight")
    led.move("c", "filtered", reason="zero_std")
    led.move("d", "failed", reason="http 500")
    led.move("e", "queued")
    led.move("e", "regenerating", reason="staleness=2")
    led.move("f", "queued")
    led.move("f", "dropped_stale", reason="staleness=2")
    counts = led.check()
    assert led.admitted == 6
    assert counts == {"in_flight": 1, "partial": 0, "queued": 0, "regenerating": 1, "trained": 1, "filtered": 1,
                      "failed": 1, "dropped_stale": 1}
    assert led.reasons() == {"filtered/zero_std": 1, "failed/http 500": 1, "regenerating/staleness=2": 1,
                             "dropped_stale/staleness=2": 1}
    assert led.state("a") == "trained" and led.step("a") == 3 and led.state("zz") is None
    led2 = Ledger.from_dict(led.to_dict())
    assert led2.counts() == counts and led2.reasons() == led.reasons() and led2.step("a") == 3
    assert led2.check() == counts


def test_ledger_rejects_impossible_moves():
    led = Ledger()
    led.admit("a")
    with pytest.raises(LedgerError, match="already admitted"):
        led.admit("a")
    with pytest.raises(LedgerError, match="in_flight -> trained is not allowed"):
        led.move("a", "trained", step=0)
    with pytest.raises(LedgerError, match="never admitted"):
        led.move("nope", "queued")
    with pytest.raises(LedgerError, match="unknown ledger state"):
        led.move("a", "lost")
    led.move("a", "queued")
    led.move("a", "trained", step=7)
    for state in ("trained", "queued", "in_flight", "dropped_stale"):
        with pytest.raises(LedgerError, match=r"already trained \(step 7\)"):
            led.move("a", state, step=8)
    assert led.check() == {**dict.fromkeys(led.counts(), 0), "trained": 1}
    led._counts["queued"] += 1  # corrupt it: check() must notice
    with pytest.raises(AssertionError, match="does not add up"):
        led.check()


# -- admission ----------------------------------------------------------------------------------------------------
def test_admission_limit_by_hand():
    assert admission_limit(0, 1, 2, 4) == 16  # (0 + 1 + 1) * 2 * 4
    assert admission_limit(3, 0, 1, 8) == 32  # (3 + 0 + 1) * 1 * 8
    assert admission_limit(2, 2, 3, 1) == 15
    assert may_admit(15, 0, 1, 2, 4) and not may_admit(16, 0, 1, 2, 4)
    with pytest.raises(ValueError):
        admission_limit(0, 1, 0, 4)
    assert groups_per_step(make_args(global_batch_size=8)) == 4
    assert groups_per_step(make_args()) == 8  # rollout_batch_size * n / steps / n
    with pytest.raises(ValueError, match="multiple"):
        groups_per_step(make_args(global_batch_size=5))


@pytest.mark.parametrize("K,N,B", [(0, 1, 1), (1, 2, 4), (2, 1, 3), (0, 3, 2)])
def test_admission_pacing_bounds_fifo_staleness(K, N, B):
    # Admit each group at the lowest version that allows it; FIFO trains group a at step a // B, version a // B // N.
    worst = 0
    for a in range(300):
        v_admit = next(v for v in range(1000) if may_admit(a, v, K, N, B))
        worst = max(worst, a // B // N - v_admit)
    assert worst == K  # the bound is tight, never exceeded


# -- filters ------------------------------------------------------------------------------------------------------
def test_builtin_filters_order_and_pop_in_place():
    def buf():
        return [group("g0", 2), group("g1", [0, 3]), group("g2", 1), group("g3", [1, 4]), group("g4", 2)]

    b = buf()
    assert ids(pop_first(None, 0, b, 2)) == ["g0", "g1"] and ids(b) == ["g2", "g3", "g4"]
    b = buf()  # max versions 2, 3, 1, 4, 2; the tie g0/g4 goes to the newer arrival
    assert ids(freshest_first(None, 0, b, 3)) == ["g3", "g1", "g4"] and ids(b) == ["g0", "g2"]
    b = buf()  # min versions 2, 0, 1, 1, 2
    assert ids(oldest_version_first(None, 0, b, 3)) == ["g1", "g2", "g3"] and ids(b) == ["g0", "g4"]
    assert load_buffer_filter(None) is pop_first and load_buffer_filter("freshest_first") is freshest_first


# -- plug-in loader -----------------------------------------------------------------------------------------------
def test_load_function_forms_and_errors(tmp_path):
    builtins = {"pop_first": pop_first, "freshest_first": freshest_first}
    assert load_function("pop_first", builtins) is pop_first
    assert load_function("buffers.filters:oldest_version_first", builtins) is oldest_version_first
    assert load_function("buffers.filters.freshest_first") is freshest_first  # slime's dotted form
    f = tmp_path / "my_plugin.py"
    f.write_text("def lifo(args, rollout_id, buffer, num_samples):\n"
                 "    return [buffer.pop() for _ in range(num_samples)]\n")
    fn = load_function(f"{f}:lifo", builtins)
    assert fn(None, 0, [1, 2, 3], 2) == [3, 2]
    assert load_function(f"{f}:lifo") is fn  # the file is imported once

    with pytest.raises(ValueError) as e:
        load_function("nonsense", builtins, what="buffer filter")
    assert str(e.value) == ("unknown buffer filter 'nonsense'; built-in choices: freshest_first, pop_first; "
                            "or 'package.module:function' or 'path/to/file.py:function'")
    with pytest.raises(ValueError, match="reward function 'no_such_mod:f': module 'no_such_mod' not found"):
        load_function("no_such_mod:f", what="reward function")
    with pytest.raises(ValueError, match="module 'buffers.filters' has no function 'nope'"):
        load_function("buffers.filters:nope")
    with pytest.raises(ValueError, match=f"file {tmp_path}/missing.py does not exist"):
        load_function(f"{tmp_path}/missing.py:f")
    with pytest.raises(ValueError, match="has no function 'fifo'"):
        load_function(f"{f}:fifo")


def test_filter_that_breaks_the_contract_is_caught():
    def no_pop(args, rollout_id, buffer, n):
        return buffer[:n]  # forgets to pop: would train these twice

    async def main():
        buf = RolloutBuffer(make_args())
        buf._filter = no_pop
        await buf.put([group("a"), group("b")])
        with pytest.raises(RuntimeError, match="must pop"):
            await buf.get(1, step=0)
        assert ids(buf.groups) == ["a", "b"] and buf.check_ledger()["queued"] == 2

    asyncio.run(main())
