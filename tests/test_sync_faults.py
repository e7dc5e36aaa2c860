"""The weight-sync sequence under faults: a failed push never leaves engines paused, a dead engine is named, a
kept-alive control connection the server dropped is reopened, and staged weights land exactly."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from streamrl.engine.actor import EmbeddedEngine
from streamrl.net import free_port
from streamrl.sync.base import control_post, sync_weights
from streamrl.sync.http_tensor import stage_named_tensors


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    with EmbeddedEngine(tiny_ckpt) as e:
        yield e


def _paused(url: str) -> bool:
    return httpx.get(url + "/server_info").json()["internal_states"][0]["paused"]


def _changed_model(tiny_ckpt: str, change):
    """The checkpoint's model with `change(param)` applied in place, and its (name, tensor) list."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    with torch.no_grad():
        for p in model.parameters():
            change(p)
    return model, [(n, p.detach()) for n, p in model.named_parameters()]


def _stream_in_background(url: str, prompt: list[int], max_new_tokens: int):
    """A greedy streamed /generate in a thread: (thread, started event, {"last": the last event})."""
    import json

    started, result = threading.Event(), {}

    def generate():
        body = {"input_ids": prompt, "stream": True, "return_logprob": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}}
        with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    result["last"] = json.loads(line[5:])
                    started.set()

    t = threading.Thread(target=generate)
    t.start()
    return t, started, result


def test_failed_push_still_continues_and_names_the_engine(engine):
    url = engine.url

    def push():
        assert _paused(url)  # the push runs inside the pause
        raise RuntimeError(f"engine {url}: weight update failed (injected)")

    with pytest.raises(RuntimeError, match="injected"):
        sync_weights([url], push=push, publish=lambda: None)
    assert not _paused(url)  # continue ran: no deadlock for the producers


@pytest.mark.parametrize("pause_while_staging", [False, True])
def test_dead_engine_is_named_and_the_live_one_is_continued(engine, pause_while_staging):
    dead = f"http://127.0.0.1:{free_port()}"
    staged = []
    with pytest.raises(ConnectionError, match=rf"engine {dead}: POST /pause_generation failed"):
        sync_weights([engine.url, dead], push=lambda: {}, publish=lambda: None, stage=lambda: staged.append(1),
                     pause_while_staging=pause_while_staging)
    assert staged == [1]
    assert not _paused(engine.url)


def test_staged_weights_land_exactly_and_the_version_moves_after_push(engine, tiny_ckpt):
    url = engine.url
    model, named = _changed_model(tiny_ckpt, lambda p: p.add_(0.01))
    before = httpx.get(url + "/get_weight_version").json()["weight_version"]
    seen = {}

    def stage():
        seen["push"] = stage_named_tensors(named, 7, 1 << 16)  # several buckets
        seen["version_after_stage"] = httpx.get(url + "/get_weight_version").json()["weight_version"]
        return {}

    stats = sync_weights([url], stage=stage, push=lambda: seen["push"]([url]), publish=lambda: None)
    assert seen["version_after_stage"] == before  # staging sends nothing
    assert httpx.get(url + "/get_weight_version").json()["weight_version"] == "7"
    got = httpx.get(url + "/weights_checksum").json()
    want = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    assert got == pytest.approx(want, rel=1e-12)
    assert stats["sync_engine_downtime"] <= stats["sync_total_time"]


def test_control_connection_reopens_after_the_server_drops_it(engine):
    url = engine.url
    assert control_post(url, "/continue_generation", b"{}")[0] == 200
    # the server closes the kept-alive connection (as after its keep-alive timeout); the next call reconnects
    from streamrl.sync import base

    conn = base._CONNS.conns[("127.0.0.1", int(url.rsplit(":", 1)[1]))]
    conn.sock.shutdown(2)
    assert control_post(url, "/continue_generation", b"{}")[0] == 200


def test_control_connections_are_per_thread(engine):
    out = []

    def call():
        out.append(control_post(engine.url, "/continue_generation", b"{}")[0])

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [200] * 4


def test_pinned_shared_memory_transport_is_exact_and_reused(engine, tiny_ckpt):
    """--update-weight-transport pinned on CPU: one /dev/shm file mapped by both sides, refilled per sync."""
    import os

    import msgspec
    from transformers import AutoModelForCausalLM

    from streamrl.sync import pinned

    url = engine.url
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    paths = set()
    for version in (11, 12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.003 * version)
        push = pinned.stage_pinned(named, version, 1 << 16, torch.float32)
        paths.add(pinned._SENDER.request.path)
        sync_weights([url], push=lambda push=push: push([url]), publish=lambda: None)
        got = httpx.get(url + "/weights_checksum").json()
        want = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
        assert got == pytest.approx(want, rel=1e-12)
        assert httpx.get(url + "/get_weight_version").json()["weight_version"] == str(version)
    assert len(paths) == 1 and not os.path.exists(paths.pop())  # one file for the job, unlinked once mapped
    req = msgspec.structs.replace(pinned._SENDER.request, path="/etc/passwd", weight_version="13")
    r = httpx.post(url + "/update_weights_from_pinned", content=msgspec.msgpack.encode(req))
    assert r.status_code == 400 and "refusing to map '/etc/passwd'" in r.json()["message"]
    assert httpx.get(url + "/get_weight_version").json()["weight_version"] == "12"


def test_in_place_pause_keeps_the_request_and_tags_each_token_with_its_version(engine, tiny_ckpt):
    """--pause-generation-mode in_place: a request in flight during a sync stays in the engine, continues under the
    new weights (its next tokens are the new model's greedy tokens), and the response says where each version's
    tokens start, so every token gets the version that produced it."""
    from streamrl.rollout.generate import token_versions

    url = engine.url
    prompt = [5, 9, 13, 17]
    model, named = _changed_model(tiny_ckpt, lambda p: p.mul_(1.5))
    before = httpx.get(url + "/get_weight_version").json()["weight_version"]
    t, started, result = _stream_in_background(url, prompt, 120)
    assert started.wait(30)
    push = stage_named_tensors(named, 31, 1 << 16)
    sync_weights([url], push=lambda: push([url]), publish=lambda: None, pause_mode="in_place")
    t.join(60)
    out = result["last"]
    meta, ids = out["meta_info"], out["output_ids"]
    assert meta["finish_reason"]["type"] == "length" and len(ids) == 120  # kept, not aborted
    (k0, v0), (k, v1) = meta["weight_version_starts"]
    assert (k0, v0, v1) == (0, before, "31") and 0 < k < 120
    assert token_versions(meta, 120) == [int(before)] * k + [31] * (120 - k)
    with torch.no_grad():  # after the update: the new weights' greedy continuation of everything so far
        cont = model.generate(torch.tensor([prompt + ids[:k]]), max_new_tokens=5, do_sample=False)
    assert ids[k:k + 5] == cont[0, len(prompt) + k:].tolist()


def test_in_place_pause_with_a_failed_push_continues_the_request_on_the_old_weights(engine):
    """A push that fails during an in-place pause: the engine is continued (no deadlock), the request in flight
    finishes under the weights it started with, and its tokens carry one version."""
    url = engine.url
    before = httpx.get(url + "/get_weight_version").json()["weight_version"]

    def push():
        assert _paused(url)
        raise RuntimeError("push failed (injected)")

    t, started, result = _stream_in_background(url, [5, 6, 7], 60)
    assert started.wait(30)
    with pytest.raises(RuntimeError, match="injected"):
        sync_weights([url], push=push, publish=lambda: None, pause_mode="in_place")
    assert not _paused(url)
    t.join(60)
    meta = result["last"]["meta_info"]
    assert meta["finish_reason"]["type"] == "length" and len(result["last"]["output_ids"]) == 60
    assert meta["weight_version"] == before and "weight_version_starts" not in meta
