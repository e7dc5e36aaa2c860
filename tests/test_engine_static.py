"""The slot KV cache (static_kv.py, the GPU fast path) gives the same tokens and log-probs as the HF-cache path.

On CPU it runs eagerly (no CUDA graphs): requests join while others decode and leave at different lengths (slot
compaction), and a weight update mid-stream re-prefills from the new weights.
"""

import threading

import pytest
import torch

from streamrl.engine.protocol import SamplingParams
from streamrl.engine.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from streamrl.engine.actor import load_model

    return load_model(tiny_ckpt)


def run(model, backend, update=None, **kw):
    sch = Scheduler(model, vocab_size=model.config.vocab_size, max_positions=256, eos_token_ids=[],
                    kv_backend=backend, max_context_len=128, **kw)
    done, all_done, third = [], threading.Event(), threading.Event()

    def on_event(o):
        done.append(o)
        if len(done) == 3:
            third.set()
        if len(done) == 6:
            all_done.set()

    reqs = [Request(rid=f"r{i}", prompt_ids=list(range(5, 8 + 2 * i)), on_event=on_event,
                    params=SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * i)) for i in range(6)]
    sch.start()
    for r in reqs[:3]:
        sch.submit(r)
    third.wait(30)  # the first three are done: the rest join a cache whose slots were compacted
    if update is not None:
        sch.update_weights(update, weight_version="1")
    for r in reqs[3:]:
        sch.submit(r)
    assert all_done.wait(60)
    sch.stop()
    return {o.rid: (o.output_ids, o.output_logprobs, o.weight_version) for o in done}


def test_static_matches_dynamic(model):
    a, b = run(model, "dynamic"), run(model, "static")
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid][0] == b[rid][0], rid
        assert a[rid][1] == pytest.approx(b[rid][1], abs=1e-4)


@pytest.mark.parametrize("backend", ["static", "dynamic"])
def test_prefill_in_token_budget_chunks_gives_the_same_tokens(model, backend):
    """--sglang-max-prefill-tokens 16: newcomers are prefilled a few at a time, longest first; same tokens and
    log-probs as one padded prefill."""
    a, b = run(model, "dynamic", max_prefill_tokens=None), run(model, backend, max_prefill_tokens=16)
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid][0] == b[rid][0], rid
        assert a[rid][1] == pytest.approx(b[rid][1], abs=1e-4)


def test_prefill_chunks_pack_longest_first_within_the_budget():
    from streamrl.engine.kv import prefill_chunks

    class R:
        def __init__(self, n):
            self.prompt_ids, self.output_ids = [0] * (n - 1), [0]

    rows = [R(n) for n in (3, 40, 9, 70, 10, 200)]
    chunks = prefill_chunks(rows, 100)
    assert [[len(r.prompt_ids) + 1 for r in c] for c in chunks] == [[200], [70], [40, 10], [9, 3]]
    assert all(len(c) * (len(c[0].prompt_ids) + 1) <= 100 for c in chunks if len(c) > 1)
    assert prefill_chunks(rows, None) == [rows] and prefill_chunks([], 100) == []


def test_static_after_weight_update(model):
    import copy

    m2 = copy.deepcopy(model)
    new = [(k, v + 0.01 * torch.randn_like(v)) for k, v in m2.state_dict().items() if k != "lm_head.weight"]
    a, b = run(copy.deepcopy(model), "dynamic", new), run(copy.deepcopy(model), "static", new)
    for rid in a:
        assert a[rid][0] == b[rid][0] and a[rid][2] == b[rid][2], rid
    assert {v[2] for v in b.values()} == {"0", "1"}


def test_flash_decode_plumbing_matches_sdpa_with_a_reference_kernel(model, monkeypatch):
    """The varlen FlashAttention branch (CUDA only) with the kernel replaced by a plain reference of its contract:
    the slot views, offsets, used lengths and GQA head mapping give the SDPA branch's logits, rows joining and
    leaving. The real kernel is compared on a GPU (tests/test_gpu.py)."""
    import streamrl.engine.static_kv as skv

    def reference(q, k, v, cu_q, cu_k, max_k, used_k):  # q [n,H,D]; k/v [n*max_len,KV,D]
        out = []
        for i in range(q.shape[0]):
            g = q.shape[1] // k.shape[1]
            kk = k[cu_k[i]:cu_k[i] + used_k[i]].repeat_interleave(g, 1)
            vv = v[cu_k[i]:cu_k[i] + used_k[i]].repeat_interleave(g, 1)
            att = (torch.einsum("hd,thd->ht", q[i], kk) / q.shape[-1] ** 0.5).softmax(-1)
            out.append(torch.einsum("ht,thd->hd", att, vv))
        return torch.stack(out)

    class Row:
        def __init__(self, prompt):
            self.prompt_ids, self.output_ids = prompt, []

    monkeypatch.setattr(skv, "_flash_varlen", reference)
    sdpa = skv.StaticKV(model, slots=4, max_len=64, use_graphs=False, decode_attention="sdpa")
    flash = skv.StaticKV(model, slots=4, max_len=64, use_graphs=False, decode_attention="sdpa")
    flash.flash = True  # the branch CUDA bf16 takes
    rows = [Row([5, 6, 7]), Row(list(range(5, 30))), Row([8] * 11)]
    with torch.no_grad():
        for step in range(8):
            if step == 3:  # the middle row leaves (compaction), a short one joins
                rows = [rows[0], rows[2], Row([9, 9])]
            order_s, ls = sdpa.step(rows)
            order_f, lf = flash.step(rows)
            assert [id(r) for r in order_s] == [id(r) for r in order_f]
            assert torch.allclose(ls, lf, atol=1e-4), (ls - lf).abs().max()
            for r, tok in zip(order_s, ls.argmax(-1).tolist(), strict=True):
                r.output_ids.append(tok)


@pytest.mark.parametrize("backend", ["static", "dynamic"])
def test_keep_kv_on_update_continues_on_the_old_weights_cache(model, backend):
    """--engine-keep-kv-on-update: a request kept through a weight update goes on with the K/V its prefix got from
    the old weights (SGLang's in-place behaviour); by default the prefix is re-prefilled with the new weights. Both
    are checked against HF forwards built the same way."""
    import copy

    from transformers import DynamicCache

    prompt = [5, 6, 7, 8]
    new_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in new_model.parameters():
            p.mul_(1.5)
    named = [(n, p.detach().clone()) for n, p in new_model.named_parameters()]

    def generate(keep):
        sch = Scheduler(copy.deepcopy(model), vocab_size=model.config.vocab_size, max_positions=256,
                        eos_token_ids=[], kv_backend=backend, max_context_len=128, keep_kv_on_update=keep)
        req = Request(rid="r", prompt_ids=prompt, params=SamplingParams(temperature=0.0, max_new_tokens=8))
        for _ in range(5):  # driven by hand (no scheduler thread): the update lands after exactly 5 tokens
            sch._step([req])
        sch.update_weights(named, weight_version="1")
        while req.finish_reason is None:
            sch._step([req])
        return req

    kept, redone = generate(True), generate(False)
    assert kept.output_ids[:5] == redone.output_ids[:5]
    assert kept.version_starts == redone.version_starts == [(0, "0"), (5, "1")]
    seq = prompt + kept.output_ids[:5]
    with torch.no_grad():
        old_cache = DynamicCache()
        model(torch.tensor([seq[:-1]]), past_key_values=old_cache, use_cache=True)  # prefix K/V, old weights
        pos = torch.tensor([[len(seq) - 1]])
        stale = new_model(torch.tensor([seq[-1:]]), past_key_values=old_cache, position_ids=pos).logits[0, -1]
        fresh = new_model(torch.tensor([seq])).logits[0, -1]
    assert kept.output_logprobs[5] == pytest.approx(torch.log_softmax(stale, -1).max().item(), abs=1e-4)
    assert redone.output_logprobs[5] == pytest.approx(torch.log_softmax(fresh, -1).max().item(), abs=1e-4)
    assert abs(kept.output_logprobs[5] - redone.output_logprobs[5]) > 1e-3  # the option changes something


def test_slot_compaction_moves_every_layer_in_one_go(model):
    """Rows leaving from the middle and the end (several per step): each remaining request's K/V, in every layer,
    is its own, at its own length, and the slots stay compacted."""
    from streamrl.engine.static_kv import StaticKV

    kv = StaticKV(model, slots=8, max_len=64, use_graphs=False)
    reqs = [object() for _ in range(8)]
    kv.rows, kv.lens = list(reqs), [3, 9, 5, 12, 7, 2, 10, 4]
    for i in range(8):  # slot i holds values i + layer/1000 in the first lens[i] positions
        kv.kv[:, i, : kv.lens[i]] = i + torch.arange(kv.kv.shape[0]).view(-1, 1, 1, 1) / 1000
    mark = {id(r): (i, kv.lens[i]) for i, r in enumerate(reqs)}
    for keep in ([reqs[0], reqs[2], reqs[3], reqs[5], reqs[6]], [reqs[3], reqs[6]], [reqs[6]]):
        kv.retain(keep)
        assert {id(r) for r in kv.rows} == {id(r) for r in keep} and len(kv.lens) == len(keep)
        for slot, r in enumerate(kv.rows):
            orig, n = mark[id(r)]
            assert kv.lens[slot] == n
            want = orig + torch.arange(kv.kv.shape[0]).view(-1, 1, 1) / 1000
            assert torch.equal(kv.kv[:, slot, :n, :, 0], want.expand(-1, n, kv.kv.shape[3]))
    assert kv.k[1].data_ptr() == kv.kv[2].data_ptr() and kv.nbytes() == kv.kv.numel() * kv.kv.element_size()
