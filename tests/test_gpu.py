"""GPU-only checks (skipped on CPU; `bash scripts/gpu/check.sh` runs them on a GPU machine)."""


import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model(tiny_ckpt):
    from streamrl.engine.actor import load_model

    return load_model(tiny_ckpt, "cuda")


def test_cuda_graph_decode_matches_eager_and_hf_path(cuda_model):
    """fp32 on CUDA: the slot cache replayed as CUDA graphs gives the HF-cache path's greedy tokens."""
    from tests.test_engine_static import run

    a, b = run(cuda_model, "dynamic"), run(cuda_model, "static")
    for rid in a:
        assert a[rid][0] == b[rid][0], rid
        assert a[rid][1] == pytest.approx(b[rid][1], abs=1e-3)


def test_flash_decode_matches_sdpa_with_mixed_lengths(tiny_ckpt):
    """bf16 on CUDA: the varlen FlashAttention decode (each slot reads only its own length) gives the masked SDPA
    decode's logits, with rows of very different lengths joining and leaving (slot compaction), under CUDA graphs."""
    import torch

    from streamrl.engine.actor import load_model
    from streamrl.engine.static_kv import StaticKV

    class Row:
        def __init__(self, prompt):
            self.prompt_ids, self.output_ids = prompt, []

    model = load_model(tiny_ckpt, "cuda").to(torch.bfloat16)
    flash = StaticKV(model, slots=8, max_len=128, decode_attention="flash")
    sdpa = StaticKV(model, slots=8, max_len=128, decode_attention="sdpa")
    assert flash.flash and not sdpa.flash
    g = torch.Generator().manual_seed(0)
    rows = [Row(torch.randint(5, 80, (n,), generator=g).tolist()) for n in (3, 40, 9, 70)]
    worst = 0.0
    with torch.inference_mode():
        for step in range(24):
            if step == 8:  # a long row leaves (compaction), a short one joins
                rows = [rows[0], rows[2], rows[3], Row([7, 8, 9])]
            order_f, lf = flash.step(rows)
            order_s, ls = sdpa.step(rows)
            assert [id(r) for r in order_f] == [id(r) for r in order_s]
            worst = max(worst, (lf - ls).abs().max().item() / ls.abs().max().item())
            for r, tok in zip(order_s, ls.argmax(-1).tolist(), strict=True):
                r.output_ids.append(tok)
    assert worst < 0.02, worst  # bf16 rounding only; a wrong length or head mapping is off by O(1)
    assert flash._graphs and all(w == flash.max_len for _, w in flash._graphs)


@pytest.mark.parametrize("engine_dtype", ["float32", "bfloat16"])
def test_cuda_ipc_sync_is_exact(tiny_ckpt, engine_dtype):
    """A trainer process pushes new weights by CUDA IPC into an engine process on the same GPU; the engine's
    weights then equal the trainer's exactly (cast to the engine's dtype while packing), and its version moves."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from streamrl.engine.actor import spawn_engine_process
    from streamrl.sync.base import sync_weights
    from streamrl.sync.cuda_ipc import push_ipc

    eng, url = spawn_engine_process(tiny_ckpt, device="cuda", dtype=engine_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).cuda()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        named = [(n, p.detach()) for n, p in model.named_parameters()]
        for version in (1, 2):  # the second sync reuses the exported buckets and opened handles
            sync_weights([url], push=lambda v=version: push_ipc([url], named, v, 1 << 20, getattr(torch, engine_dtype)),
                         publish=lambda: None)
            got = httpx.get(url + "/weights_checksum", timeout=60).json()
            dt = getattr(torch, engine_dtype)
            want = {k: float(v.to(dt).double().sum()) for k, v in model.state_dict().items()}
            assert got == pytest.approx(want, rel=0, abs=0)
            assert httpx.get(url + "/get_weight_version").json()["weight_version"] == str(version)
            with torch.no_grad():
                named[0][1].add_(1.0)
    finally:
        eng.kill()


def test_mem_fraction_static_caps_the_engine_kv_cache(tiny_ckpt):
    """--sglang-mem-fraction-static on CUDA: the slots that fit in the fraction (minus the weights) cap the running
    requests, and the slot cache allocates exactly that many."""
    import torch

    from streamrl.engine.actor import EmbeddedEngine, kv_bytes_per_slot, load_model, model_bytes

    total = torch.cuda.get_device_properties(0).total_memory
    probe = load_model(tiny_ckpt, dtype=torch.bfloat16)
    slot = kv_bytes_per_slot(probe.config, 1024, torch.bfloat16)
    frac = (model_bytes(probe) + 100.5 * slot) / total  # weights + room for 100 slots (fewer than the default cap)
    eng = EmbeddedEngine(tiny_ckpt, device="cuda", dtype="bfloat16", max_context_len=1024, mem_fraction_static=frac)
    try:
        sch = eng.scheduler
        want = (int(total * frac) - model_bytes(sch.model)) // slot
        assert want == 100
        assert sch.max_running_requests == want
        assert sch._kv.slots == want and sch._kv.nbytes() == want * slot
    finally:
        eng.stop()


def test_engine_step_stats_with_cuda_events(cuda_model):
    """The engine's iteration stats on CUDA (timing.py: device time per phase from CUDA events): 4 requests of 10
    greedy tokens joining together = 1 prefill iteration + 9 decode iterations, 40 rows."""
    import threading

    from streamrl.engine.protocol import SamplingParams
    from streamrl.engine.scheduler import Request, Scheduler

    sch = Scheduler(cuda_model, vocab_size=cuda_model.config.vocab_size, max_positions=256, eos_token_ids=[],
                    max_context_len=128)
    outs, done = [], threading.Event()

    def on_event(o):
        outs.append(o)
        if len(outs) == 4:
            done.set()

    sch.pause("in_place")  # all four join the first iteration
    sch.start()
    for i in range(4):
        sch.submit(Request(rid=f"r{i}", prompt_ids=[5, 6, 7 + i], on_event=on_event,
                           params=SamplingParams(temperature=0.0, max_new_tokens=10)))
    sch.resume()
    assert done.wait(60)
    sch.stop()
    st = sch.stats()
    assert (st["iterations"], st["rows"], st["prefill_rows"], st["prefill_iterations"]) == (10, 40, 4, 1)
    assert all(st[f"time_{k}"] > 0 for k in ("decode", "prefill", "sample", "host"))
    assert st["time_decode"] + st["time_prefill"] + st["time_sample"] <= sch.busy_time
