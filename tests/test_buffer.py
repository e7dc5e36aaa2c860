"""Buffer: ledger, admission pacing, filters, plug-in loader and the Ray buffer actor (fast; one ray.init)."""

from __future__ import annotations

import asyncio
import types

import pytest
import ray

from buffers import (
    BufferClosed,
    Ledger,
    LedgerError,
    RolloutBuffer,
    admission_limit,
    freshest_first,
    groups_per_step,
    load_buffer_filter,
    make_buffer_actor,
    may_admit,
    oldest_version_first,
    pop_first,
)
from streamrl.plugins import load_function
from streamrl.types import Sample, Status


def group(gid: str, version: int | list[int] = 0, n: int = 2) -> list[Sample]:
    """A finished group whose samples were generated at `version` (one per sample if a list)."""
    out = []
    for i in range(n):
        v = version[i] if isinstance(version, list) else version
        s = Sample(group_id=gid, index=i, prompt="p", tokens=[1, 2, 3])
        s.append_response_tokens(tokens=[7, 8], log_probs=[-0.5, -0.25], version=v, finish_reason="stop")
        out.append(s)
    return out


def ids(groups) -> list[str]:
    return [g[0].group_id for g in groups]


def make_args(**kw):
    d = dict(async_buffer_size=4, max_staleness=1, stale_policy="drop", buffer_filter_path=None,
             n_samples_per_prompt=2, update_weights_interval=1, global_batch_size=None, rollout_batch_size=8,
             num_steps_per_rollout=1)
    d.update(kw)
    return types.SimpleNamespace(**d)


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
    b = buf()  # max versions 2, 3, 1, 4, 2
    assert ids(freshest_first(None, 0, b, 3)) == ["g3", "g1", "g0"] and ids(b) == ["g2", "g4"]
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


# -- the Ray actor ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_ctx():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def actor(ray_ctx):
    made = []

    def make(**kw):
        made.append(make_buffer_actor(make_args(**kw)))
        return made[-1]

    yield make
    for a in made:
        ray.kill(a)


def test_put_get_fifo_and_ledger(actor):
    a = actor()
    assert ray.get(a.put.remote([group(f"g{i}") for i in range(3)])) == 3
    got = ray.get(a.get.remote(2, step=0))
    assert ids(got) == ["g0", "g1"] and got[0][1].tokens == [1, 2, 3, 7, 8] and got[0][0].status == Status.COMPLETED
    assert ray.get(a.size.remote()) == 1
    counts = ray.get(a.check_ledger.remote())
    assert counts == {**dict.fromkeys(counts, 0), "queued": 1, "trained": 2}
    with pytest.raises(ValueError, match="already trained"):  # never trained twice, even if a producer re-puts it
        ray.get(a.put.remote([group("g0")]))
    with pytest.raises(ValueError, match="group 'bad' has 3 samples; n_samples_per_prompt is 2"):
        ray.get(a.put.remote([group("bad", n=3)]))
    s = ray.get(a.stats.remote())
    assert (s["size"], s["capacity"], s["groups_put"], s["groups_got"], s["admitted"]) == (1, 4, 3, 2, 3)


def test_put_blocks_when_full_and_resumes_after_get(actor):
    a = actor()
    ray.get(a.put.remote([group(f"g{i}") for i in range(4)]))
    with pytest.raises(TimeoutError, match="0 of 1 groups were put"):
        ray.get(a.put.remote([group("late")], timeout=0.5))
    bg = a.put.remote([group("g4"), group("g5")])  # blocks: backpressure, never a drop
    assert ray.get(a.size.remote()) == 4  # the blocked put does not block other calls
    assert ids(ray.get(a.get.remote(1, step=0))) == ["g0"]
    assert ids(ray.get(a.get.remote(1, step=1))) == ["g1"]
    assert ray.get(bg, timeout=10) == 2
    assert ids(ray.get(a.get.remote(4, step=2))) == ["g2", "g3", "g4", "g5"]
    s = ray.get(a.stats.remote())
    assert s["put_blocked_s"] > 0 and s["ledger"]["trained"] == 6 and s["ledger"]["in_flight"] == 0
    ray.get(a.check_ledger.remote())


def test_stale_drop_and_get_waits_for_fresh_replacements(actor):
    a = actor(max_staleness=1, stale_policy="drop")
    ray.get(a.put.remote([group("old0", 0), group("fresh0", 2), group("old1", [0, 2])]))
    ray.get(a.set_version.remote(2))
    pending = a.get.remote(2, step=5)  # takes fresh0, drops old0 and old1 (staleness 2), then waits
    ray.get(a.put.remote([group("fresh1", [1, 2])]))
    assert ids(ray.get(pending, timeout=10)) == ["fresh0", "fresh1"]
    s = ray.get(a.stats.remote())
    assert s["reasons"] == {"dropped_stale/staleness=2": 2}
    assert (s["ledger"]["dropped_stale"], s["ledger"]["trained"], s["staleness_mean"], s["staleness_max"]) == (
        2, 2, 0.5, 1)
    assert ray.get(a.check_ledger.remote())["queued"] == 0


def test_get_timeout_puts_held_groups_back(actor):
    a = actor(max_staleness=0, stale_policy="drop")
    ray.get(a.set_version.remote(1))
    ray.get(a.put.remote([group("fresh", 1), group("stale", 0)]))
    with pytest.raises(TimeoutError, match="get"):
        ray.get(a.get.remote(2, step=0, timeout=0.5))
    assert ray.get(a.size.remote()) == 1
    counts = ray.get(a.check_ledger.remote())
    assert (counts["queued"], counts["dropped_stale"], counts["trained"]) == (1, 1, 0)
    assert ids(ray.get(a.get.remote(1, step=0))) == ["fresh"]


def test_stale_regenerate_roundtrip(actor):
    a = actor(max_staleness=0, stale_policy="regenerate")
    ray.get(a.admit.remote(["old", "new"]))
    ray.get(a.put.remote([group("old", 0)]))
    ray.get(a.set_version.remote(1))
    ray.get(a.put.remote([group("new", 1)]))
    assert ids(ray.get(a.get.remote(1, step=0))) == ["new"]
    counts = ray.get(a.check_ledger.remote())
    assert (counts["regenerating"], counts["trained"], ray.get(a.stats.remote())["regenerate_pending"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="regenerating -> queued is not allowed"):  # must be taken back first
        ray.get(a.put.remote([group("old", 1)]))
    [regen] = ray.get(a.take_regenerate.remote(8))
    assert ids([regen]) == ["old"] and all(
        s.response_length == 0 and s.token_versions == [] and s.tokens == [1, 2, 3] and s.status == Status.PENDING
        and s.reward is None for s in regen)
    assert ray.get(a.ledger_counts.remote())["in_flight"] == 1 and ray.get(a.take_regenerate.remote(8)) == []
    for s in regen:  # the producer generates again at the current version
        s.append_response_tokens(tokens=[9], log_probs=[-1.0], version=1, finish_reason="stop")
    ray.get(a.put.remote([regen]))
    assert ids(ray.get(a.get.remote(1, step=1))) == ["old"]
    s = ray.get(a.stats.remote())
    assert s["reasons"] == {"regenerating/staleness=1": 1} and s["ledger"]["trained"] == 2 and s["admitted"] == 2


def test_producer_hooks(actor):
    a = actor()
    ray.get(a.admit.remote(["p", "f", "x"]))
    with pytest.raises(ValueError, match="already admitted"):
        ray.get(a.admit.remote(["q", "p"]))
    ray.get(a.mark.remote("p", "partial"))
    ray.get(a.mark.remote("f", "filtered", "zero_std"))
    ray.get(a.mark.remote("x", "failed", "timeout"))
    with pytest.raises(ValueError, match="set by the buffer itself"):
        ray.get(a.mark.remote("p", "trained"))
    ray.get(a.put.remote([group("q")]))
    with pytest.raises(ValueError, match="'q' is queued in the buffer"):
        ray.get(a.mark.remote("q", "filtered", "late"))
    counts = ray.get(a.check_ledger.remote())
    assert (counts["partial"], counts["filtered"], counts["failed"], counts["queued"]) == (1, 1, 1, 1)
    assert ray.get(a.stats.remote())["reasons"] == {"filtered/zero_std": 1, "failed/timeout": 1}


def test_close_releases_blocked_put_and_get(actor):
    full, empty = actor(async_buffer_size=1), actor()
    ray.get(full.put.remote([group("g0")]))
    put_ref = full.put.remote([group("g1")])
    get_ref = empty.get.remote(1, step=0)
    ready, _ = ray.wait([put_ref, get_ref], num_returns=2, timeout=0.2)
    assert ready == []  # both really blocked
    ray.get([full.close.remote(), empty.close.remote()])
    for ref in (put_ref, get_ref):
        with pytest.raises(BufferClosed, match="closed"):
            ray.get(ref, timeout=1.0)
    with pytest.raises(BufferClosed):
        ray.get(full.put.remote([group("g2")]))
    assert ids(ray.get(full.get.remote(1, step=0))) == ["g0"]  # a closed buffer still drains
    assert ray.get(full.check_ledger.remote())["trained"] == 1


def test_custom_filter_from_file_in_actor(actor, tmp_path):
    f = tmp_path / "lifo_filter.py"
    f.write_text("def lifo(args, rollout_id, buffer, num_samples):\n"
                 "    return [buffer.pop() for _ in range(num_samples)]\n")
    a = actor(buffer_filter_path=f"{f}:lifo")
    ray.get(a.put.remote([group(f"g{i}") for i in range(4)]))
    assert ids(ray.get(a.get.remote(3, step=0))) == ["g3", "g2", "g1"]


def test_state_dict_roundtrip(actor):
    a = actor(stale_policy="regenerate", max_staleness=0)
    ray.get(a.admit.remote(["inflight"]))
    ray.get(a.put.remote([group("s0", 0), group("q0", 1), group("q1", [1, 1]), group("q2", 1)]))
    ray.get(a.set_version.remote(1))
    assert ids(ray.get(a.get.remote(1, step=0))) == ["q0"]  # s0 went to the regenerate list
    sd = ray.get(a.state_dict.remote())
    assert isinstance(sd["groups"], bytes) and sd["version"] == 1
    b = actor(stale_policy="regenerate", max_staleness=0)
    ray.get(b.load_state_dict.remote(sd))
    sa, sb = ray.get(a.stats.remote()), ray.get(b.stats.remote())
    for k in ("size", "version", "ledger", "reasons", "admitted", "groups_got", "regenerate_pending"):
        assert sa[k] == sb[k], k
    assert sb["ledger"] == {**dict.fromkeys(sb["ledger"], 0), "in_flight": 1, "queued": 2, "regenerating": 1,
                            "trained": 1}
    got_a, got_b = ray.get(a.get.remote(2, step=1)), ray.get(b.get.remote(2, step=1))
    assert ids(got_b) == ["q1", "q2"] and got_a == got_b  # msgspec Structs compare by value
    assert ray.get(b.take_regenerate.remote(1))[0][0].group_id == "s0"
    with pytest.raises(ValueError, match="already trained"):
        ray.get(b.put.remote([group("q0", 1)]))
