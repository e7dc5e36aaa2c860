"""Embedded engine: SGLang HTTP contract, continuous batching, abort/pause, weight updates. CPU only, tiny model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from streamrl.engine.actor import EmbeddedEngine, make_engine_actor
from streamrl.engine.protocol import SamplingParams
from streamrl.engine.sampling import sample_tokens
from streamrl.engine.scheduler import Request, Scheduler
from streamrl.weights.tensor import (
    deserialize_named_tensors,
    encode_update_request,
    serialize_named_tensors,
)

torch.set_num_threads(1)
VOCAB = 64
PROMPT = [5, 6, 7, 8]
MSGPACK = {"content-type": "application/msgpack"}


def _tiny_model(seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
        initializer_range=0.2,  # peakier logits than the default 0.02, so outputs depend visibly on the weights
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    _tiny_model(0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engine(model_dir):
    with EmbeddedEngine(model_dir, torch_threads=1) as eng:
        yield eng


@pytest.fixture
def client(engine):
    with httpx.Client(base_url=engine.url, timeout=60) as c:
        yield c
    # Leave the shared engine usable for the next test whatever happened.
    httpx.post(engine.url + "/continue_generation", json={})


def gen(client, input_ids=PROMPT, **sp):
    body = {"input_ids": input_ids, "sampling_params": sp, "return_logprob": True}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def check_aligned(out):
    meta = out["meta_info"]
    lps = meta["output_token_logprobs"]
    assert meta["completion_tokens"] == len(out["output_ids"]) == len(lps)
    assert [t for _, t, _ in lps] == out["output_ids"]
    assert all(lp <= 0.0 and txt is None for lp, _, txt in lps)
    assert all(0 <= t < VOCAB for t in out["output_ids"])


# ---- pure units ---------------------------------------------------------------------------------------------------
def test_weights_round_trip_and_rejects_bad_bytes():
    named = [
        ("a", torch.randn(3, 4)),
        ("b", torch.randn(5).to(torch.bfloat16)),
        ("c", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.zeros(0, 7)),
    ]
    back = deserialize_named_tensors(serialize_named_tensors(named))
    assert [n for n, _ in back] == [n for n, _ in named]
    for (_, x), (_, y) in zip(named, back, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    bad = msgspec.msgpack.encode([["a", "float32", [2, 2], b"\x00" * 15]])
    with pytest.raises(ValueError, match="bytes"):
        deserialize_named_tensors(bad)
    with pytest.raises(ValueError):
        deserialize_named_tensors(msgspec.msgpack.encode([["a", "complex32", [1], b"\x00" * 4]]))


def test_sampling_logprobs_and_truncation():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 3
    temps = torch.tensor([0.0, 0.7, 1.0, 1.3])
    toks, lps = sample_tokens(logits, temps, torch.tensor([1.0, 1.0, 1e-6, 1.0]), torch.tensor([-1, 1, -1, -1]))
    assert toks[0] == logits[0].argmax() and toks[1] == logits[1].argmax() and toks[2] == logits[2].argmax()
    scale = torch.tensor([1.0, 0.7, 1.0, 1.3]).unsqueeze(1)  # greedy rows report the T=1 distribution
    expect = torch.log_softmax(logits / scale, -1).gather(1, toks.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(lps, expect)
    # Seeded rows are reproducible regardless of the rest of the batch; top_k=3 keeps draws in the top 3.
    draws = [
        sample_tokens(logits, torch.ones(4), torch.ones(4), torch.full((4,), 3), [torch.Generator().manual_seed(s)] * 4)
        for s in (1, 1)
    ]
    assert torch.equal(draws[0][0], draws[1][0])
    top3 = logits.topk(3).indices
    assert all(draws[0][0][i] in top3[i] for i in range(4))


def test_scheduler_default_eos_and_ignore_eos(engine):
    """Scheduler API without HTTP, sharing the engine's model: the model's eos ids stop generation."""
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    model = engine.scheduler.model
    ref = gen_direct(Scheduler(model, vocab_size=VOCAB, max_positions=256), [greedy])[0]
    eos = ref.output_ids[2]
    k = ref.output_ids.index(eos)
    sch = Scheduler(model, vocab_size=VOCAB, max_positions=256, eos_token_ids=[eos])
    stopped, ignored = gen_direct(sch, [greedy, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)])
    assert stopped.output_ids == ref.output_ids[: k + 1]
    assert stopped.finish_reason == {"type": "stop", "matched": eos}
    assert ignored.output_ids == ref.output_ids and ignored.finish_reason == {"type": "length", "length": 12}


def gen_direct(sch: Scheduler, params: list[SamplingParams]):
    """Run one request per params on a fresh scheduler; returns their final RequestOutputs."""
    outs, done = {}, threading.Semaphore(0)

    def on_event(o):
        outs[o.rid] = o
        done.release()

    sch.start()
    try:
        for i, p in enumerate(params):
            sch.submit(Request(f"r{i}", list(PROMPT), p, on_event=on_event))
        for _ in params:
            assert done.acquire(timeout=20)
    finally:
        sch.stop()
    return [outs[f"r{i}"] for i in range(len(params))]


# ---- /generate ----------------------------------------------------------------------------------------------------
def test_generate_round_trip(client):
    r = client.post(
        "/generate",
        json={"input_ids": PROMPT, "rid": "rt-1", "return_logprob": True,
              "sampling_params": {"max_new_tokens": 9, "temperature": 1.0, "top_p": 0.9, "top_k": 20}},
    )  # fmt: skip
    assert r.status_code == 200
    out = r.json()
    check_aligned(out)
    meta = out["meta_info"]
    assert meta["id"] == "rt-1" and meta["prompt_tokens"] == 4 and meta["completion_tokens"] == 9
    assert meta["finish_reason"] == {"type": "length", "length": 9}
    assert meta["weight_version"] == "0" and out["text"] == ""  # no tokenizer in the model dir
    # Without return_logprob the field is absent.
    meta = client.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}).json()
    assert "output_token_logprobs" not in meta["meta_info"]


def test_greedy_matches_hf_generate_and_logprobs(client, model_dir):
    ref_model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = ref_model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=12, eos_token_id=None)
        ref_ids = ref[0, len(PROMPT) :].tolist()
        ref_lp = torch.log_softmax(ref_model(ref).logits[0, len(PROMPT) - 1 : -1], -1)
    out = gen(client, max_new_tokens=12, temperature=0.0)
    assert out["output_ids"] == ref_ids
    got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
    torch.testing.assert_close(got, ref_lp.gather(1, torch.tensor(ref_ids).unsqueeze(1)).squeeze(1), atol=1e-4, rtol=0)


def test_stop_token_and_seeded_sampling(client):
    a = gen(client, max_new_tokens=16, temperature=1.0, sampling_seed=123)
    b = gen(client, max_new_tokens=16, temperature=1.0, sampling_seed=123)
    assert a["output_ids"] == b["output_ids"]  # sampling_seed makes sampling reproducible
    stop = a["output_ids"][3]
    k = a["output_ids"].index(stop)
    out = gen(client, max_new_tokens=16, temperature=1.0, sampling_seed=123, stop_token_ids=[stop])
    check_aligned(out)
    assert out["output_ids"] == a["output_ids"][: k + 1]  # the stop token is included
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    out = gen(client, max_new_tokens=16, temperature=1.0, sampling_seed=123, stop_token_ids=[stop], ignore_eos=True)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 16}
    out = gen(client, max_new_tokens=0)
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_batched_input_returns_list_in_order(client):
    prompts = [[1, 2], [3, 4, 5], [6]]
    r = client.post(
        "/generate",
        json={"input_ids": prompts, "rid": ["x0", "x1", "x2"], "return_logprob": True,
              "sampling_params": {"max_new_tokens": 3, "temperature": 0.0}},
    )  # fmt: skip
    outs = r.json()
    assert [o["meta_info"]["id"] for o in outs] == ["x0", "x1", "x2"]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [2, 3, 1]
    for o, p in zip(outs, prompts, strict=True):
        check_aligned(o)
        assert o["output_ids"] == gen(client, p, max_new_tokens=3, temperature=0.0)["output_ids"]


def test_concurrent_requests_share_forward_steps(client, engine):
    sch = engine.scheduler
    # Hold requests at the door (in_place pause) so that all 8 join the same iteration deterministically.
    assert client.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    steps0, n_sizes0 = sch.forward_steps, len(sch.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(gen, client, [i + 1, i + 2], max_new_tokens=6, temperature=1.0) for i in range(8)]
        wait_for(lambda: client.get("/v1/loads").json()["loads"][0]["num_waiting_reqs"] == 8, what="8 waiting")
        assert sch.forward_steps == steps0 and not any(f.done() for f in futs)
        assert client.post("/continue_generation", json={}).status_code == 200
        outs = [f.result(timeout=30) for f in futs]
    for o in outs:
        check_aligned(o)
        assert o["meta_info"]["completion_tokens"] == 6
    assert sch.forward_steps - steps0 == 6  # 8 requests x 6 tokens in 6 batched forwards, not 48
    assert list(sch.batch_sizes)[n_sizes0:] == [8] * 6


def test_stream_is_cumulative(client):
    events = []
    body = {"input_ids": PROMPT, "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0.0}}  # fmt: skip
    with client.stream("POST", "/generate", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    ids = [c["output_ids"] for c in chunks]
    assert all(ids[i] == ids[i + 1][: len(ids[i])] for i in range(len(ids) - 1))  # each event extends the last
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert ids[-1] == gen(client, max_new_tokens=5, temperature=0.0)["output_ids"]


# ---- abort / pause ------------------------------------------------------------------------------------------------
def _start_long(pool, client, rid, n=240):
    body = {"input_ids": PROMPT, "rid": rid, "return_logprob": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True}}  # fmt: skip
    return pool.submit(lambda: client.post("/generate", json=body))


def _wait_tokens(engine, rid, k=3):
    def ok():
        snap = engine.scheduler.get(rid)
        return snap is not None and len(snap.output_ids) >= k

    wait_for(ok, what=f"{k} tokens of {rid}")


def test_abort_by_rid_and_abort_all(client, engine):
    with ThreadPoolExecutor(3) as pool:
        f = _start_long(pool, client, "ab-1")
        _wait_tokens(engine, "ab-1")
        assert client.post("/abort_request", json={"rid": "no-such-rid"}).status_code == 200  # no-op
        r = client.post("/abort_request", json={"rid": "ab-1"})
        assert r.status_code == 200 and r.content == b""
        out = f.result(timeout=30).json()
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert 3 <= len(out["output_ids"]) < 240
        check_aligned(out)

        fs = [_start_long(pool, client, f"all-{i}") for i in range(2)]
        for i in range(2):
            _wait_tokens(engine, f"all-{i}")
        assert client.post("/abort_request", json={"abort_all": True}).status_code == 200
        for fut in fs:
            out = fut.result(timeout=30).json()
            assert out["meta_info"]["finish_reason"]["type"] == "abort" and 3 <= len(out["output_ids"]) < 240
            check_aligned(out)
    loads = client.get("/v1/loads", params={"include": "core"}).json()["loads"][0]
    assert loads["num_running_reqs"] == 0 and loads["num_waiting_reqs"] == 0


def test_client_disconnect_aborts_request(client, engine):
    # Hold the request in the queue (in_place pause) so the client's timeout fires whatever the machine's speed.
    assert client.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    body = {"input_ids": PROMPT, "rid": "gone", "sampling_params": {"max_new_tokens": 4}}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(engine.url + "/generate", json=body, timeout=0.3)
    # The server notices the closed connection and drops the request, even while paused.
    wait_for(lambda: engine.scheduler.get("gone") is None, timeout=5, what="abort on disconnect")
    assert client.get("/v1/loads").json()["num_waiting_reqs"] == 0


def test_pause_aborts_in_flight_and_holds_new_requests(client, engine):
    with ThreadPoolExecutor(2) as pool:
        f = _start_long(pool, client, "p-1")
        _wait_tokens(engine, "p-1")
        assert client.post("/pause_generation", json={}).status_code == 200
        # pause returns only once in-flight requests have drained from the engine (their HTTP replies may still be
        # on the wire, so check the scheduler rather than the client future).
        assert engine.scheduler.get("p-1") is None and engine.scheduler.load()["num_running_reqs"] == 0
        out = f.result(timeout=30).json()
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        check_aligned(out)

        late = pool.submit(gen, client, max_new_tokens=4, temperature=0.0)
        wait_for(lambda: client.get("/v1/loads").json()["num_waiting_reqs"] == 1, what="late request queued")
        assert not late.done() and client.get("/health").status_code == 200
        assert client.post("/continue_generation", json={}).status_code == 200
        out = late.result(timeout=30)
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


# ---- weights ------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_engine(model_dir):
    with EmbeddedEngine(model_dir, torch_threads=1, weight_version="v0") as eng:
        yield eng


def test_update_weights_from_tensor(fresh_engine):
    c = httpx.Client(base_url=fresh_engine.url, timeout=60)
    before = gen(c, max_new_tokens=10, temperature=0.0)
    assert before["meta_info"]["weight_version"] == "v0"
    new = _tiny_model(1).state_dict()
    body = encode_update_request(list(new.items()), weight_version="7")
    r = c.post("/update_weights_from_tensor", content=body, headers=MSGPACK)
    assert r.status_code == 200 and r.json() == {"success": True, "message": ""}
    assert c.get("/get_weight_version").json() == {"weight_version": "7"}
    assert c.get("/model_info").json()["weight_version"] == "7"
    assert c.get("/get_server_info").json()["weight_version"] == "7"
    after = gen(c, max_new_tokens=10, temperature=0.0)
    assert after["meta_info"]["weight_version"] == "7"
    assert after["output_ids"] != before["output_ids"]
    checksum = fresh_engine.state_dict_checksum()
    assert checksum == pytest.approx({k: float(v.double().sum()) for k, v in new.items()}, rel=1e-9, abs=1e-9)

    # Unknown name, or a good name with a wrong shape: 400, nothing changed (validation precedes any copy).
    for bad in (
        [("model.norm.weight", torch.zeros(64)), ("no.such.param", torch.zeros(1))],
        [("model.norm.weight", torch.zeros(64)), ("lm_head.weight", torch.zeros(3, 3))],
    ):
        r = c.post("/update_weights_from_tensor", content=encode_update_request(bad, "8"), headers=MSGPACK)
        assert r.status_code == 400 and r.json()["success"] is False
    r = c.post("/update_weights_from_tensor", content=b"\xc1garbage", headers=MSGPACK)
    assert r.status_code == 400
    assert fresh_engine.state_dict_checksum() == checksum and fresh_engine.get_weight_version() == "7"
    assert gen(c, max_new_tokens=10, temperature=0.0)["output_ids"] == after["output_ids"]


def test_update_weights_from_disk(fresh_engine, tmp_path):
    c = httpx.Client(base_url=fresh_engine.url, timeout=60)
    other = _tiny_model(2)
    other.save_pretrained(tmp_path / "m2")
    r = c.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "nope"), "weight_version": "9"})
    assert r.status_code == 400 and r.json()["success"] is False
    assert c.get("/get_weight_version").json()["weight_version"] == "v0"
    r = c.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "m2"), "weight_version": "2"})
    assert r.status_code == 200 and r.json()["success"] is True
    sd = fresh_engine.get_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in other.state_dict().items())
    info = c.get("/model_info").json()
    assert info["weight_version"] == "2" and info["model_path"] == str(tmp_path / "m2")


# ---- errors and info ----------------------------------------------------------------------------------------------
BAD_BODIES = [
    b"not json",
    b'{"input_ids": "abc"}',
    b"{}",
    b'{"input_ids": []}',
    b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}',
    b'{"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}}',
    b'{"input_ids": [1, 2], "sampling_params": {"top_p": 0}}',
    b'{"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}',
    b'{"input_ids": [1, 999]}',
    b'{"input_ids": [1, -1]}',
    b'{"input_ids": [1.5]}',
    b'{"input_ids": [true]}',
    b'{"input_ids": [[1], [2]], "rid": "one-rid-for-a-batch"}',
    b'{"input_ids": [1], "sampling_params": {"stop_token_ids": [64]}}',
    b'{"input_ids": [1], "sampling_params": {"stop": ["x"]}}',
    b'{"text": "needs a tokenizer"}',
    b'{"input_ids": [1], "sampling_params": {"repetition_penalty": 1.3}}',
    msgspec.json.encode({"input_ids": [1] * 257}),
]


def test_malformed_inputs_are_400(client):
    for body in BAD_BODIES:
        r = client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["message"], body
    for path, body in [("/abort_request", b"[1]"), ("/pause_generation", b'{"mode": "sideways"}'),
                       ("/update_weights_from_disk", b"{}")]:  # fmt: skip
        assert client.post(path, content=body).status_code == 400, path
    assert client.get("/health").status_code == 200
    assert gen(client, max_new_tokens=2)["meta_info"]["completion_tokens"] == 2


def test_info_health_and_loads(client, model_dir):
    for path in ("/model_info", "/get_model_info", "/server_info", "/get_server_info"):
        info = client.get(path).json()
        assert info["model_path"] == model_dir and info["weight_version"] == "0", path
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200
    assert client.get("/flush_cache").status_code == 200 and client.post("/flush_cache").status_code == 200
    loads = client.get("/v1/loads", params={"include": "core"}).json()
    assert loads["loads"][0]["num_running_reqs"] == 0 and loads["loads"][0]["num_waiting_reqs"] == 0


# ---- Ray ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_actor(ray_session, model_dir):
    ray = ray_session
    actor = make_engine_actor(num_cpus=1).remote(model_dir, weight_version="r0")
    try:
        url = ray.get(actor.url.remote(), timeout=120)
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        assert ray.get(actor.get_weight_version.remote()) == "r0"
        checksum = ray.get(actor.state_dict_checksum.remote())
        expect = {k: float(v.double().sum()) for k, v in _tiny_model(0).state_dict().items()}
        assert checksum == pytest.approx(expect, rel=1e-9, abs=1e-9)
    finally:
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)


def test_mem_fraction_static_sizes_the_kv_slots():
    """--sglang-mem-fraction-static for the embedded engine: weights + KV slots within the fraction of the GPU."""
    from types import SimpleNamespace

    from streamrl.engine.actor import kv_bytes_per_slot, kv_slots_for_budget

    cfg = SimpleNamespace(hidden_size=1024, num_attention_heads=16, head_dim=128, num_key_value_heads=8,
                          num_hidden_layers=28)  # Qwen3-0.6B
    slot = kv_bytes_per_slot(cfg, 300, torch.bfloat16)  # 300 -> the 512-token length bucket
    assert slot == 2 * 28 * 512 * 8 * 128 * 2  # 56 MiB
    cfg.max_position_embeddings = 256  # the slot cache never holds more than the model's positions
    assert kv_bytes_per_slot(cfg, 1024, torch.bfloat16) == 2 * 28 * 256 * 8 * 128 * 2
    del cfg.max_position_embeddings
    gib = 2**30
    # 80 GiB card, 0.1 -> 8 GiB; 1.5 GiB of weights -> 6.5 GiB / 56 MiB = 118 slots
    assert kv_slots_for_budget(80 * gib, 0.1, int(1.5 * gib), slot, 256) == int(6.5 * gib) // slot == 118
    assert kv_slots_for_budget(80 * gib, 0.5, int(1.5 * gib), slot, 64) == 64  # enough room: the flag's cap
    with pytest.raises(ValueError, match="--sglang-mem-fraction-static 0.01.*not one KV slot"):
        kv_slots_for_budget(80 * gib, 0.01, int(1.5 * gib), slot, 64)
    with pytest.raises(ValueError, match="must be in"):
        kv_slots_for_budget(80 * gib, 1.5, 0, slot, 64)


def test_kv_slot_estimate_matches_the_slot_cache(tiny_ckpt):
    """The budget's bytes per slot are what StaticKV really allocates (capped by the model's positions)."""
    from streamrl.engine.actor import kv_bytes_per_slot, load_model
    from streamrl.engine.static_kv import StaticKV

    model = load_model(tiny_ckpt)
    for ctx in (100, 1024):
        kv = StaticKV(model, slots=3, max_len=min(ctx, model.config.max_position_embeddings), use_graphs=False)
        assert kv.nbytes() == 3 * kv_bytes_per_slot(model.config, ctx, next(model.parameters()).dtype)


def test_spawn_engine_process_serves_and_reports_a_crash(tiny_ckpt, tmp_path):
    """The separate-process engine used by the GPU test and the weight-sync bench: it answers, and a process that
    dies before /health is reported at once, not after the timeout."""
    from streamrl.engine.actor import spawn_engine_process

    proc, url = spawn_engine_process(tiny_ckpt, device="cpu", max_running_requests=4)
    try:
        assert httpx.get(url + "/get_weight_version").json()["weight_version"] == "0"
    finally:
        proc.kill()
    t0 = time.time()
    with pytest.raises(RuntimeError, match="exited with code"):
        spawn_engine_process(str(tmp_path / "no-such-model"), timeout=120)
    assert time.time() - t0 < 60
