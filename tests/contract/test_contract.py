"""SGLang's native HTTP API as documented (docs/sglang.md): the embedded engine and SGLang must agree.

Deterministic: greedy decoding, and aborts are made race-free by pausing in place first (a paused request makes no
progress, so it is still running when the abort arrives).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

PROMPT = [5, 6, 7, 8]


def gen(url, **body):
    body.setdefault("input_ids", PROMPT)
    body.setdefault("sampling_params", {"max_new_tokens": 4, "temperature": 0.0})
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_response_shape(base_url):
    out = gen(base_url, return_logprob=True, rid="contract-shape")
    meta = out["meta_info"]
    assert set(out) >= {"text", "output_ids", "meta_info"}
    assert meta["id"] == "contract-shape" and meta["prompt_tokens"] == len(PROMPT)
    assert meta["completion_tokens"] == len(out["output_ids"]) <= 4
    assert meta["finish_reason"]["type"] in ("length", "stop")
    lps = meta["output_token_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"] and all(lp <= 0 and text is None for lp, _, text in lps)
    assert isinstance(meta["weight_version"], str)


def test_length_and_stop_token(base_url):
    out = gen(base_url, sampling_params={"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    first = out["output_ids"][0]
    stopped = gen(base_url, sampling_params={"max_new_tokens": 3, "temperature": 0.0, "stop_token_ids": [first]})
    assert stopped["output_ids"] == [first]  # the stop token is part of output_ids
    assert stopped["meta_info"]["finish_reason"]["type"] == "stop"


def test_batched_generate_keeps_order(base_url):
    prompts = [PROMPT, [9, 10, 11], PROMPT[:2]]
    outs = gen(base_url, input_ids=prompts, return_logprob=True)
    assert isinstance(outs, list) and len(outs) == 3
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [4, 3, 2]
    single = gen(base_url, input_ids=prompts[1])
    assert outs[1]["output_ids"] == single["output_ids"]  # greedy: same answer alone or in a batch


def test_streaming_is_cumulative(base_url):
    body = {"input_ids": PROMPT, "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", base_url + "/generate", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[5:]) for ln in lines[:-1]]
    ids = [e["output_ids"] for e in events]
    assert all(b[: len(a)] == a for a, b in zip(ids, ids[1:], strict=False))  # each event extends the last
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length" and len(ids[-1]) == 5
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert ids[-1] == gen(base_url, sampling_params={"max_new_tokens": 5, "temperature": 0.0,
                                                      "ignore_eos": True})["output_ids"]


def _queued(url):
    loads = httpx.get(url + "/v1/loads?include=core").json()["loads"]
    return sum(x["num_running_reqs"] + x["num_waiting_reqs"] for x in loads)


def test_abort_by_rid_returns_prefix(base_url):
    httpx.post(base_url + "/pause_generation", json={"mode": "in_place"}, timeout=30).raise_for_status()
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(gen, base_url, rid="contract-abort", return_logprob=True,
                              sampling_params={"max_new_tokens": 64, "temperature": 0.0, "ignore_eos": True})
            while _queued(base_url) == 0:  # polling until the request is in (the pause holds it there)
                assert not fut.done(), fut.result()
            assert httpx.post(base_url + "/abort_request", json={"rid": "contract-abort"}).status_code == 200
            out = fut.result(timeout=60)
    finally:
        httpx.post(base_url + "/continue_generation", json={}, timeout=30)
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and len(out["output_ids"]) < 64
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert httpx.post(base_url + "/abort_request", json={"rid": "no-such-rid"}).status_code == 200


def test_requests_wait_during_pause(base_url):
    httpx.post(base_url + "/pause_generation", json={"mode": "in_place"}, timeout=30).raise_for_status()
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(gen, base_url, sampling_params={"max_new_tokens": 2, "temperature": 0.0})
            while _queued(base_url) == 0:
                assert not fut.done(), "a request sent during a pause must wait, not be rejected"
            assert not fut.done()
            httpx.post(base_url + "/continue_generation", json={}, timeout=30).raise_for_status()
            out = fut.result(timeout=60)
    finally:
        httpx.post(base_url + "/continue_generation", json={}, timeout=30)
    assert out["meta_info"]["finish_reason"]["type"] in ("length", "stop")


def test_info_endpoints_agree_on_weight_version(base_url):
    v = httpx.get(base_url + "/get_weight_version").json()["weight_version"]
    assert httpx.get(base_url + "/model_info").json()["weight_version"] == v
    info = httpx.get(base_url + "/server_info").json()
    assert info["weight_version"] == v or info["internal_states"][0]["weight_version"] == v
    assert gen(base_url)["meta_info"]["weight_version"] == v
    assert httpx.get(base_url + "/health").status_code == 200
    loads = httpx.get(base_url + "/v1/loads?include=core").json()
    assert {"num_running_reqs", "num_waiting_reqs"} <= set(loads["loads"][0])


@pytest.mark.parametrize("body", [
    b"not json",
    {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": -1}},
    {"input_ids": PROMPT, "sampling_params": {"top_p": 1.5}},
    {"input_ids": "abc"},
    {"sampling_params": {"max_new_tokens": 2}},
    {"input_ids": PROMPT, "sampling_params": {"top_k": 0}},  # SGLang: -1 (disable) or at least 1
    pytest.param(b'{"input_ids": ' + b"[" * 1000 + b"]" * 1000 + b"}", id="nested-1000-deep"),  # ~2 KB
])
def test_malformed_input_is_4xx(base_url, body):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(base_url + "/generate", timeout=30, **kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert httpx.get(base_url + "/health").status_code == 200  # and the server is still alive


def test_context_length_is_enforced(base_url):
    """SGLang refuses (400) a prompt that reaches the context length, or prompt + max_new_tokens beyond it."""
    info = httpx.get(base_url + "/server_info").json()
    ctx = info["context_length"]
    assert {"tp_size", "dp_size", "pp_size"} <= set(info)  # sglang-router --dp-aware reads dp_size

    def post(n_prompt, max_new):
        body = {"input_ids": [5] * n_prompt, "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0}}
        return httpx.post(base_url + "/generate", json=body, timeout=60)

    r = post(ctx, 1)
    assert r.status_code == 400 and "longer than the model's context length" in r.text, r.text
    r = post(ctx - 4, 5)
    assert r.status_code == 400 and "exceeds the model's maximum context length" in r.text, r.text
    out = post(ctx - 4, 4).json()  # exactly at the context: served, cut by max_new_tokens only
    assert out["meta_info"]["prompt_tokens"] == ctx - 4 and len(out["output_ids"]) <= 4
