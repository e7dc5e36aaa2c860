"""The embedded engine's /release_memory_occupation and /resume_memory_occupation (SGLang's, for --colocate) over
HTTP on CPU: tags, status codes, generation held while released, weights intact after a resume, refusals."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from streamrl.engine.actor import EmbeddedEngine
from streamrl.weights.tensor import encode_update_request

torch.set_num_threads(1)
GREEDY = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}}
MSGPACK = {"content-type": "application/msgpack"}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    # bf16 weights are converted on load (not memory-mapped) and the slot cache is preallocated: both really shrink
    with EmbeddedEngine(tiny_ckpt, torch_threads=1, dtype="bfloat16", kv_backend="static") as eng:
        yield eng


def _storage_bytes(eng: EmbeddedEngine) -> tuple[int, int]:
    sch = eng.scheduler
    weights = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                   for p in sch.model.parameters()}.values())
    return weights, sch.kv.kv.untyped_storage().nbytes()


def _released(c: httpx.Client) -> list[str]:
    return c.get("/server_info").json()["internal_states"][0]["memory_released"]


def _generate_in_thread(url: str) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        out["r"] = httpx.post(url + "/generate", json=GREEDY, timeout=60)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_release_holds_generation_and_resume_restores_the_weights(engine):
    with httpx.Client(base_url=engine.url, timeout=60) as c:
        before = c.post("/generate", json=GREEDY).json()["output_ids"]
        weights, kv = _storage_bytes(engine)
        assert weights > 0 and kv > 0

        r = c.post("/release_memory_occupation", json={})  # SGLang: no tags = every tag
        assert r.status_code == 200 and r.json()["success"]
        assert _released(c) == ["cuda_graph", "kv_cache", "weights"]
        assert _storage_bytes(engine) == (0, 0)  # the memory is given back
        assert c.post("/release_memory_occupation", json={"tags": ["weights"]}).status_code == 200  # a no-op

        t, out = _generate_in_thread(engine.url)  # waits, as during a pause
        time.sleep(0.5)
        assert t.is_alive() and c.get("/v1/loads").json()["num_waiting_reqs"] == 1
        named = [(n, torch.zeros(p.shape, dtype=p.dtype)) for n, p in engine.scheduler.params().items()]
        upd = c.post("/update_weights_from_tensor", headers=MSGPACK,
                     content=encode_update_request(named[:1], "9"))
        assert upd.status_code == 400 and "released" in upd.json()["message"]

        assert c.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
        assert _storage_bytes(engine)[0] == weights and _released(c) == ["cuda_graph", "kv_cache"]
        assert c.get("/resume_memory_occupation", params={}).status_code == 200  # GET, like SGLang: the rest
        t.join(30)
        assert not t.is_alive() and out["r"].status_code == 200
        assert out["r"].json()["output_ids"] == before  # weights intact, cache rebuilt
        assert _storage_bytes(engine) == (weights, kv) and _released(c) == []


def test_refusals(engine):
    with httpx.Client(base_url=engine.url, timeout=60) as c:
        r = c.post("/release_memory_occupation", json={"tags": ["weights", "activations"]})
        assert r.status_code == 400 and "cuda_graph" in r.json()["message"] and _released(c) == []
        r = c.post("/resume_memory_occupation", json={"tags": ["kv_cache"]})  # SGLang raises KeyError there
        assert r.status_code == 400 and "not released" in r.json()["message"]
        assert c.post("/release_memory_occupation", content=b"{bad").status_code == 400

        long = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        t = threading.Thread(target=lambda: httpx.post(engine.url + "/generate", json=long, timeout=60))
        t.start()
        deadline = time.time() + 10
        while c.get("/v1/loads").json()["num_running_reqs"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        r = c.post("/release_memory_occupation", json={"tags": ["kv_cache"]})
        assert r.status_code == 400 and "/pause_generation" in r.json()["message"]  # a request holds K/V
        c.post("/pause_generation", json={})  # abort: the request returns its prefix
        t.join(30)
        assert c.post("/release_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
        assert c.post("/resume_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
        c.post("/continue_generation", json={})
        assert c.post("/generate", json=GREEDY).status_code == 200


def test_a_sync_refills_the_weights_while_the_cache_is_released(engine):
    """The colocated order (slime's): resume the weights, sync, then resume the KV cache and graphs."""
    with httpx.Client(base_url=engine.url, timeout=60) as c:
        before = c.post("/generate", json=GREEDY).json()
        c.post("/pause_generation", json={})
        assert c.post("/release_memory_occupation", json={}).status_code == 200
        assert c.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
        named = [(n, torch.full(p.shape, 0.01 * (i % 5), dtype=p.dtype))
                 for i, (n, p) in enumerate(engine.scheduler.params().items())]
        upd = c.post("/update_weights_from_tensor", headers=MSGPACK,
                     content=encode_update_request(named, "7"))
        assert upd.status_code == 200, upd.text
        c.post("/continue_generation", json={})
        t, out = _generate_in_thread(engine.url)
        time.sleep(0.3)
        assert t.is_alive()  # continue does not run anything while the cache is released
        assert c.post("/resume_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]}).status_code == 200
        t.join(30)
        after = out["r"].json()
        assert after["meta_info"]["weight_version"] == "7" and after["output_ids"] != before["output_ids"]


def test_memory_mapped_weights_stay_but_the_contract_holds(tiny_ckpt):
    """float32 on CPU: the weights are the checkpoint file, mapped; nothing to give back, the same answers."""
    with EmbeddedEngine(tiny_ckpt, torch_threads=1) as eng, httpx.Client(base_url=eng.url, timeout=60) as c:
        before = c.post("/generate", json=GREEDY).json()["output_ids"]
        assert c.post("/release_memory_occupation", json={"tags": None}).status_code == 200
        assert c.get("/server_info").json()["internal_states"][0]["memory_host_bytes"] == 0
        assert c.post("/resume_memory_occupation", json={"tags": []}).status_code == 200
        assert c.post("/generate", json=GREEDY).json()["output_ids"] == before
