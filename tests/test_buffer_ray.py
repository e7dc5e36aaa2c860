"""The buffer as a Ray actor: FIFO and ledger, backpressure, staleness, close, plug-in filters, checkpoints, and the
object-store path (payloads owned by the buffer actor, so a dying producer loses nothing). One ray.init."""

from __future__ import annotations

import sys
import time

import buffer_helpers
import pytest
import ray
from buffer_helpers import group, ids, make_args

from buffers import BufferClosed, decode_batch, encode_batch, make_buffer_actor
from streamrl.types import Status

for _mod in (buffer_helpers, sys.modules[__name__]):  # Ray workers cannot import tests/: ship these by value
    ray.cloudpickle.register_pickle_by_value(_mod)


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
    ray.get(a.mark.remote("f", "filtered", "zero_std", tokens=(4, {})))
    ray.get(a.mark.remote("x", "failed", "timeout", tokens=(0, {"abort_restart": 2})))
    with pytest.raises(ValueError, match="set by the buffer itself"):
        ray.get(a.mark.remote("p", "trained"))
    ray.get(a.put.remote([group("q")]))
    with pytest.raises(ValueError, match="'q' is queued in the buffer"):
        ray.get(a.mark.remote("q", "filtered", "late", tokens=(0, {})))
    counts = ray.get(a.check_ledger.remote())
    assert (counts["partial"], counts["filtered"], counts["failed"], counts["queued"]) == (1, 1, 1, 1)
    assert ray.get(a.stats.remote())["reasons"] == {"filtered/zero_std": 1, "failed/timeout": 1}
    assert ray.get(a.token_ledger.remote())["discarded"] == {"filtered": 4, "abort_restart": 2}


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


# -- the encoded path (what producers and driver use) and dying producers ----------------------------------------
@ray.remote(num_cpus=0)
class Producer:
    """A producer in its own process: puts groups as msgpack bytes, or blocks in a put."""

    def put(self, buf, names: list[str]) -> int:
        return ray.get(buf.put_encoded.remote(encode_batch([group(n, 1) for n in names])))

    def put_blocking(self, buf, names: list[str]) -> int:
        return ray.get(buf.put.remote([group(n, 1) for n in names]))


def test_encoded_path_roundtrip_and_mixed_inputs(actor):
    a = actor(async_buffer_size=8)
    assert ray.get(a.put_encoded.remote(encode_batch([group("e0", 1), group("e1", 1)]))) == 2
    ray.get(a.put.remote([group("o0", 1)]))
    got = decode_batch(ray.get(a.get_encoded.remote(3, step=0)))
    assert ids(got) == ["e0", "e1", "o0"] and got[0] == group("e0", 1) and got[2] == group("o0", 1)
    ray.get(a.put_encoded.remote(encode_batch([group("e2", 1)])))
    assert ids(ray.get(a.get.remote(1, step=1))) == ["e2"]  # an encoded group decoded inside the actor
    counts = ray.get(a.check_ledger.remote())
    assert (counts["trained"], counts["queued"]) == (4, 0)


def test_encoded_groups_survive_their_producer_and_a_checkpoint(actor, tmp_path):
    a = actor(async_buffer_size=8, stale_policy="regenerate", max_staleness=0)
    p = Producer.remote()
    assert ray.get(p.put.remote(a, ["p0", "p1", "p2"])) == 3
    ray.kill(p)  # the producer process dies: its groups are bytes held by the buffer
    ray.get(a.set_version.remote(2))  # p0..p2 (version 1) are stale now: regenerate decodes one inside the actor
    ray.get(a.put_encoded.remote(encode_batch([group("fresh", 2)])))
    assert ids(decode_batch(ray.get(a.get_encoded.remote(1, step=0, timeout=10)))) == ["fresh"]
    regen = ray.get(a.take_regenerate.remote(1))
    assert ids(regen) == ["p0"] and regen[0][0].response_length == 0 and regen[0][0].tokens == [1, 2, 3]
    assert regen[0][0].discarded_tokens == {"stale_regenerate": 2}  # the token ledger keeps what was dropped
    b_args = dict(async_buffer_size=8, stale_policy="regenerate", max_staleness=5)
    c = actor(**b_args)
    ray.get(c.put_encoded.remote(encode_batch([group("q0", 1), group("q1", 1)])))
    path = str(tmp_path / "buf")
    ray.get(c.save.remote(path))
    d = actor(**b_args)
    ray.get(d.load.remote(path))
    assert ray.get(d.get_encoded.remote(2, step=0)) == ray.get(c.get_encoded.remote(2, 0))


def test_producer_killed_while_blocked_in_put(actor):
    a = actor(async_buffer_size=2)
    p = Producer.remote()
    call = p.put_blocking.remote(a, ["k0", "k1", "k2"])  # k2 blocks: the buffer is full
    deadline = time.monotonic() + 60  # the producer actor has to start first
    while ray.get(a.size.remote()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ray.get(a.size.remote()) == 2
    ray.kill(p)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(call, timeout=10)
    assert ids(ray.get(a.get.remote(2, step=0, timeout=10))) == ["k0", "k1"]
    # the dead producer's pending put may still complete (its group was already sent) or not; either way the
    # buffer stays consistent and nothing hangs
    ray.get(a.close.remote())
    rest = []
    while True:
        try:
            rest += ids(ray.get(a.get.remote(1, step=1, timeout=10)))
        except BufferClosed:
            break
    counts = ray.get(a.check_ledger.remote())
    assert rest in ([], ["k2"]) and counts["trained"] == 2 + len(rest) and counts["queued"] == 0
