"""Engine KV cache: cached decoding must match the recompute path and HF `generate`, across joins, seeded sampling,
pauses, weight updates and aborts. Scheduler API only (no HTTP), CPU, tiny random models."""

from __future__ import annotations

import threading
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from streamrl.engine.kv import KVBatch
from streamrl.engine.protocol import SamplingParams
from streamrl.engine.scheduler import Request, Scheduler

torch.set_num_threads(1)
VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
             initializer_range=0.2)  # fmt: skip


def tiny(seed: int = 0, arch: str = "qwen3", **kw):
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES, **kw)).eval()
    return Qwen3ForCausalLM(Qwen3Config(**SIZES, **kw)).eval()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


# Four prompts of different lengths; (i, k) = submit once request i has k tokens, i.e. join while others decode.
PLAN = [
    ([5, 6, 7, 8], None),
    ([1, 2], (0, 2)),
    ([3, 4, 5, 6, 7, 8, 9, 10, 11], (0, 4)),
    ([9], (1, 1)),
    ([12, 13, 14, 15, 16, 17], (2, 3)),
]


def run_plan(model, plan, params, *, kv_cache, max_running=256, on_token=None, during=None, **kw):
    """Run `plan` [(prompt, after)] on a fresh scheduler; returns (final outputs, per-request event lists, scheduler).

    Requests stream, so `on_token(sch, i, out)` and the join triggers fire on the scheduler thread after every token:
    the join points are deterministic, hence identical for the cached and the recompute runs. `during(sch)` runs on
    the test thread while requests are in flight."""
    sch = Scheduler(model, vocab_size=VOCAB, max_positions=256, kv_cache=kv_cache, max_running_requests=max_running,
                    weight_version="v0", **kw)  # fmt: skip
    events: list[list] = [[] for _ in plan]
    submitted: set[int] = set()
    done = threading.Semaphore(0)

    def submit(i):
        submitted.add(i)
        sch.submit(Request(f"r{i}", list(plan[i][0]), params[i], stream=True, on_event=partial(on_event, i)))

    def on_event(i, out):
        events[i].append(out)
        for j, (_, after) in enumerate(plan):
            if j not in submitted and after is not None and after[0] == i and len(out.output_ids) >= after[1]:
                submit(j)
        if on_token is not None:
            on_token(sch, i, out)
        if out.finished:
            done.release()

    sch.pause("in_place")  # the first requests all join the first iteration
    sch.start()
    try:
        for i, (_, after) in enumerate(plan):
            if after is None:
                submit(i)
        sch.resume()
        if during is not None:
            during(sch)
        for _ in plan:
            assert done.acquire(timeout=60)
    finally:
        sch.stop()
    return [ev[-1] for ev in events], events, sch


def hf_reference(model, prompt, n):
    """HF greedy continuation of `prompt` and the log-probs of its tokens (full-sequence forward, no cache)."""
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
        ids = ref[0, len(prompt) :]
        lp = torch.log_softmax(model(ref).logits[0, len(prompt) - 1 : -1], -1).gather(1, ids[:, None])[:, 0]
    return ids.tolist(), lp


def assert_same(a, b):
    """Identical tokens and finish reasons, log-probs within 1e-4."""
    for x, y in zip(a, b, strict=True):
        assert x.output_ids == y.output_ids and x.finish_reason == y.finish_reason
        torch.testing.assert_close(torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_cache_matches_recompute_and_hf(arch):
    model = tiny(0, arch)
    params = [greedy(n) for n in (12, 9, 10, 7, 8)]
    cached, _, sch = run_plan(model, PLAN, params, kv_cache=True)
    assert sch.kv_cache and len(sch._kv) == 0 and sch._kv.nbytes() == 0  # every finished request freed its K/V
    recomputed, _, _ = run_plan(model, PLAN, params, kv_cache=False)
    assert_same(cached, recomputed)
    for out, (prompt, _), p in zip(cached, PLAN, params, strict=True):
        ids, lp = hf_reference(model, prompt, p.max_new_tokens)
        assert out.output_ids == ids and out.finish_reason == {"type": "length", "length": p.max_new_tokens}
        torch.testing.assert_close(torch.tensor(out.output_logprobs), lp, atol=1e-4, rtol=0)
    # max_running_requests staggers admission differently; the outputs must not change.
    capped, _, _ = run_plan(model, PLAN, params, kv_cache=True, max_running=2)
    assert_same(capped, cached)


def test_stop_tokens_with_cache():
    model = tiny(0)
    ref, _, _ = run_plan(model, PLAN, [greedy(12)] * 5, kv_cache=False)
    stop = ref[0].output_ids[4]
    params = [SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])] * 5
    cached, _, _ = run_plan(model, PLAN, params, kv_cache=True)
    recomputed, _, _ = run_plan(model, PLAN, params, kv_cache=False)
    assert_same(cached, recomputed)
    k = ref[0].output_ids.index(stop)
    assert cached[0].output_ids == ref[0].output_ids[: k + 1]
    assert cached[0].finish_reason == {"type": "stop", "matched": stop}


def test_seeded_sampling_same_with_and_without_cache():
    model = tiny(0)
    params = [SamplingParams(max_new_tokens=10, temperature=t, top_p=tp, top_k=tk, sampling_seed=100 + i)
              for i, (t, tp, tk) in enumerate([(1.0, 1.0, -1), (0.7, 0.9, -1), (1.3, 1.0, 8), (1.0, 0.8, 5),
                                               (0.9, 1.0, -1)])]  # fmt: skip
    cached, _, _ = run_plan(model, PLAN, params, kv_cache=True)
    recomputed, _, _ = run_plan(model, PLAN, params, kv_cache=False)
    assert_same(cached, recomputed)


@pytest.mark.parametrize("update", [True, False])
def test_in_place_pause_and_weight_update_mid_stream(update):
    """Request 0 pauses the engine (in place) at its 6th token; the test thread then swaps the weights (or not) and
    resumes. Cached K/V from the old weights must not leak into the continuation."""
    plan, params, split = PLAN[:2], [greedy(16), greedy(14)], 6
    new_weights = list(tiny(1).state_dict().items())

    def run(kv_cache):
        model = tiny(0)
        at_split, kept = threading.Event(), []

        def on_token(sch, i, out):
            if i == 0 and len(out.output_ids) == split:
                sch.pause("in_place", timeout=0)  # no wait: we are on the scheduler thread, mid-iteration
                at_split.set()

        def during(sch):
            assert at_split.wait(30) and sch.pause("in_place", timeout=30)
            kept.append(len(sch._kv))  # in_place keeps the requests and their cache
            if update:
                sch.update_weights(new_weights, weight_version="v1")
            sch.resume()

        outs, events, _ = run_plan(model, plan, params, kv_cache=kv_cache, on_token=on_token, during=during)
        return outs, events, kept[0], model

    cached, events, kept, model = run(True)
    recomputed, _, kept_recompute, _ = run(False)
    assert (kept, kept_recompute) == (2, 0)
    assert_same(cached, recomputed)
    for out, ev, (prompt, _), p in zip(cached, events, plan, params, strict=True):
        k = sum(e.weight_version == "v0" for e in ev) if update else 0  # tokens generated before the update
        assert [e.weight_version for e in ev] == ["v0"] * k + ["v1" if update else "v0"] * (len(ev) - k)
        # `model` now has the new weights: the continuation is theirs, given the old weights' prefix.
        ids, lp = hf_reference(model, prompt + out.output_ids[:k], p.max_new_tokens - k)
        assert out.output_ids[k:] == ids
        torch.testing.assert_close(torch.tensor(out.output_logprobs[k:]), lp, atol=1e-4, rtol=0)
    assert sum(e.weight_version == "v0" for e in events[0]) == (split if update else 16)


def test_abort_and_abort_pause_free_the_cache():
    model = tiny(0)
    plan = [([5, 6, 7, 8], None), ([1, 2, 3], None), ([4, 4], (1, 1))]
    params = [SamplingParams(max_new_tokens=200, temperature=1.0, ignore_eos=True)] * 3
    seen = {}

    def on_token(sch, i, out):
        if i == 0 and len(out.output_ids) == 3:
            sch.abort("r0")  # re-entrant: the scheduler's lock is held here

    def during(sch):
        def request_1_got(n):
            return (snap := sch.get("r1")) is not None and len(snap.output_ids) >= n

        while not request_1_got(8):
            threading.Event().wait(0.005)
        assert sch.pause("in_place", timeout=30)
        seen["rows"] = [r.rid for r in sch._kv.rows]
        sch.resume()
        assert sch.pause("abort", timeout=30)
        seen["after_abort_pause"] = (len(sch._kv), sch._kv.nbytes())
        sch.resume()

    outs, _, _ = run_plan(model, plan, params, kv_cache=True, on_token=on_token, during=during)
    assert outs[0].finish_reason["type"] == "abort" and len(outs[0].output_ids) == 3
    assert all(o.finish_reason["type"] == "abort" and len(o.output_ids) == len(o.output_logprobs) for o in outs)
    assert sorted(seen["rows"]) == ["r1", "r2"]  # r0's K/V went with its abort
    assert seen["after_abort_pause"] == (0, 0)


def test_kv_batch_rows_equal_solo_prefill():
    """Rows surviving joins (merge) and leaves (retain) hold exactly the K/V of a solo prefill of their sequence."""
    model = tiny(0)

    def forward(ids, mask, pos, cache):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1]

    a, b, c = (SimpleNamespace(prompt_ids=p, output_ids=[]) for p in ([1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]))
    kv = KVBatch()
    with torch.inference_mode():
        for batch in ([a, b], [a, b], [a, b, c], [b, c], [b, c]):
            rows, logits = kv.step(batch, forward)
            for r, t in zip(rows, logits.argmax(-1).tolist(), strict=True):
                r.output_ids.append(t)
        assert kv.rows == [b, c]
        cached = [len(r.prompt_ids) + len(r.output_ids) - 1 for r in (b, c)]
        assert kv.mask.shape[1] == max(cached)  # a's (longest) columns were trimmed away when it left
        for r, n in zip((b, c), cached, strict=True):
            solo = model(torch.tensor([(r.prompt_ids + r.output_ids)[:n]]), use_cache=True).past_key_values
            for layer in range(2):
                k, v = kv.row_kv(r, layer)
                torch.testing.assert_close(k, solo.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v, solo.layers[layer].values[0], atol=1e-5, rtol=1e-5)


def test_sliding_window_models_fall_back_to_recompute():
    model = tiny(0, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding_attention" in model.config.layer_types
    assert not Scheduler(model, vocab_size=VOCAB, max_positions=256).kv_cache


def test_embedded_engine_kv_cache_flag(tmp_path):
    """The flag reaches the scheduler through EmbeddedEngine; both engines answer the same over HTTP."""
    import httpx

    from streamrl.engine.actor import EmbeddedEngine

    tiny(0).save_pretrained(tmp_path)
    body = {"input_ids": [[5, 6, 7, 8], [1, 2]], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0.0}}  # fmt: skip
    outs = []
    for kv_cache in (True, False):
        with EmbeddedEngine(str(tmp_path), kv_cache=kv_cache) as eng:
            assert eng.scheduler.kv_cache is kv_cache
            outs.append(httpx.post(eng.url + "/generate", json=body, timeout=60).json())
    assert [o["output_ids"] for o in outs[0]] == [o["output_ids"] for o in outs[1]]
    for a, b in zip(outs[0], outs[1], strict=True):
        la = torch.tensor([lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]])
        lb = torch.tensor([lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)


def test_continuous_decode_steps_batch_joins_same_outputs():
    """SGLang's --num-continuous-decode-steps k: requests arriving while others decode join at most every k
    iterations (one prefill for several arrivals), and the greedy outputs do not change."""
    plan = [([5, 6, 7, 8], None), ([1, 2], (0, 1)), ([3, 4, 5], (0, 2)), ([9], (0, 3))]
    params = [greedy(12)] * len(plan)
    base, _, s1 = run_plan(tiny(), plan, params, kv_cache=True)
    out, _, s3 = run_plan(tiny(), plan, params, kv_cache=True, num_continuous_decode_steps=3)
    assert_same(base, out)
    # k=1: r0's prefill, then each arrival its own; k=3: r0, then r1..r3 together at the 4th iteration
    assert s1.stats()["prefill_iterations"] == 4 and s3.stats()["prefill_iterations"] == 2
    for s in (s1, s3):
        st = s.stats()
        assert st["prefill_rows"] == 4
        assert st["rows"] == sum(len(o.output_ids) for o in out)  # one row per generated token
        assert all(st[f"time_{k}"] > 0 for k in ("decode", "prefill", "sample", "host"))
    with pytest.raises(ValueError, match="num_continuous_decode_steps"):
        Scheduler(tiny(), vocab_size=VOCAB, max_positions=256, num_continuous_decode_steps=0)


@pytest.mark.parametrize("mode", ["in_place", "abort"])
def test_held_back_arrivals_survive_pauses(mode):
    """A request waiting for its admission turn (--sglang-num-continuous-decode-steps) is neither lost nor run
    early by a pause: in_place keeps it waiting, abort returns it (no tokens) as it does every active request."""
    model = tiny(0)
    plan = [([5, 6, 7, 8], None), ([1, 2, 3], (0, 1))]  # r1 arrives at r0's first token
    params = [SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True), greedy(5)]
    seen = {}

    def during(sch):
        while (snap := sch.get("r0")) is not None and len(snap.output_ids) < 4:
            threading.Event().wait(0.002)
        assert sch.pause(mode, timeout=30)
        seen["load"] = sch.load()
        sch.resume()

    outs, _, sch = run_plan(model, plan, params, kv_cache=True, during=during, num_continuous_decode_steps=50)
    if mode == "in_place":  # r1 held back (50 iterations), kept through the pause, admitted once r0 finished
        assert seen["load"] == {"num_running_reqs": 1, "num_waiting_reqs": 1}
        assert len(outs[0].output_ids) == 30 and outs[1].output_ids == hf_reference(model, [1, 2, 3], 5)[0]
        assert sch.stats()["prefill_iterations"] == 2
    else:
        assert seen["load"] == {"num_running_reqs": 0, "num_waiting_reqs": 0}
        assert outs[1].finish_reason["type"] == "abort" and outs[1].output_ids == []
        assert outs[0].finish_reason["type"] == "abort" and 4 <= len(outs[0].output_ids) < 30
