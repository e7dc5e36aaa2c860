"""The embedded engine's HTTP limits where they must match SGLang: sizes in /server_info, a deep or huge body is
a 400 on a connection that stays usable, and a huge `text` is tokenized without blocking the event loop."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from streamrl.engine.actor import EmbeddedEngine


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    with EmbeddedEngine(tiny_ckpt, max_running_requests=8) as eng:
        yield eng


def test_server_info_has_parallel_sizes(engine):
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(engine.url + path).json()
        assert (info["tp_size"], info["dp_size"], info["pp_size"]) == (1, 1, 1), path


def test_deep_json_is_400_and_keeps_the_connection(engine):
    def nested(depth: int) -> bytes:
        return b'{"input_ids": ' + b"[" * depth + b"]" * depth + b"}"

    # msgspec's depth limit is Python's recursion limit, which torch.compile raises (1000 -> 2000) in a process
    # that compiled anything: 2 KB of brackets is then a type error, 100 KB (parsed off the event loop) too deep
    # for any limit; either way a 400 on a connection that stays open
    with httpx.Client(base_url=engine.url, timeout=30) as c:
        for depth, why in ((1000, ("nested too deeply", "input_ids must be integers")),
                           (50_000, ("nested too deeply",))):
            r = c.post("/generate", content=nested(depth), headers={"content-type": "application/json"})
            assert r.status_code == 400 and any(w in r.json()["error"]["message"] for w in why), depth
            assert r.headers.get("connection") != "close"
        for path in ("/abort_request", "/pause_generation"):  # too deep for any limit (their bodies have no
            assert c.post(path, content=nested(50_000)).status_code == 400, path  # input_ids to type-check)
        ok = c.post("/generate", json={"text": "ab", "sampling_params": {"max_new_tokens": 1}})  # same socket
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 1


def test_top_k_zero_is_refused(engine):
    r = httpx.post(engine.url + "/generate", json={"text": "ab", "sampling_params": {"top_k": 0}})
    assert r.status_code == 400 and "top_k must be -1 (disable), or at least 1, got 0" in r.text


def test_huge_text_is_tokenized_off_the_event_loop(engine, monkeypatch):
    """While a large body is being tokenized, /health and /abort_request still answer: the tokenizer here blocks
    until they have, so with tokenization on the loop this test fails (health times out) instead of passing."""
    tok = engine.scheduler.tokenizer
    entered, answered = threading.Event(), threading.Event()
    real = tok.encode

    def slow_encode(text, *a, **kw):
        if len(text) > 8_000:
            entered.set()
            answered.wait(30)
        return real(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", slow_encode)
    # a batch of texts each short enough to be tokenized (see the next test), 72 KB in all: parsed off the loop
    body = {"text": ["a" * 9_000] * 8, "sampling_params": {"max_new_tokens": 1}}
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(httpx.post, engine.url + "/generate", json=body, timeout=60)
            assert entered.wait(30), "the large request never reached the tokenizer"
            assert httpx.get(engine.url + "/health", timeout=10).status_code == 200
            assert httpx.post(engine.url + "/abort_request", json={"rid": "x"}, timeout=10).status_code == 200
            answered.set()
            r = fut.result(timeout=60)
    finally:
        answered.set()
    assert r.status_code == 400 and "longer than the model's context length" in r.text


def test_a_text_too_long_for_any_tokenization_is_refused_without_tokenizing(engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine.scheduler.tokenizer, "encode", lambda text, *a, **kw: calls.append(len(text)))
    r = httpx.post(engine.url + "/generate", json={"text": "a" * 10_000_000}, timeout=60)
    assert r.status_code == 400 and "(at least " in r.text and "10000000 characters" in r.text, r.text[:300]
    assert calls == []  # refused from its length alone
