"""A dead engine leaves rotation and nothing fails for it: the client sends its requests to a live engine (killed:
refused or reset; frozen: found by the health watchdog), a streamed sample keeps its prefix, the abort/pause fan-out
skips it, and a weight sync goes on with the others."""

from __future__ import annotations

import json
import logging
import socket
import threading

import anyio
import httpx
import pytest

from streamrl.engine.actor import EmbeddedEngine
from streamrl.rollout.client import EngineClient, EngineError, NoEngineError
from streamrl.sync.base import sync_weights

GREEDY = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    with EmbeddedEngine(tiny_ckpt, weight_version="3") as e:
        yield e


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Frozen:
    """A listening socket that never accepts: connections complete (kernel backlog) and then nothing answers, as
    with a SIGSTOPped server."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"


class DiesMidStream:
    """Streams `events` for one /generate, then dies (listener closed first, so /health is refused, then the
    connection is cut without the final event)."""

    def __init__(self, events: list[dict]):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.events = events
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for ev in self.events:
            data = f"data: {json.dumps(ev)}\n\n".encode()
            conn.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.sock.close()
        # cut without the final chunk, but after the events arrived: FIN, not a reset (closing with unread request
        # bytes would send RST, and the client could lose the last event)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        conn.close()


def _versions_served(client: EngineClient, n: int) -> list[str]:
    async def run():
        outs = [await client.generate({"input_ids": [5, 6, 7], "sampling_params": GREEDY, "return_logprob": True})
                for _ in range(n)]
        await client.aclose()
        return [o["meta_info"]["weight_version"] for o in outs]

    return anyio.run(run)


def test_killed_engine_is_dropped_and_its_request_served_by_a_live_one(engine, caplog):
    dead = closed_port_url()
    client = EngineClient([dead, engine.url], retries=1, retry_wait=0.001)
    with caplog.at_level(logging.WARNING, logger="streamrl.rollout.client"):
        assert _versions_served(client, 2) == ["3", "3"]  # the first went to the dead engine first
    assert client.urls == [engine.url] and list(client.dead) == [dead] and client.failures == 1
    assert "ConnectError" in client.dead[dead]
    assert [r.getMessage().split(" failed")[0] for r in caplog.records] == [f"engine {dead}"]


def test_frozen_engine_is_found_by_the_watchdog_and_its_request_sent_again(engine):
    frozen = Frozen()
    client = EngineClient([frozen.url, engine.url], health_check_interval=0.2, health_check_timeout=0.5)
    assert _versions_served(client, 1) == ["3"]
    assert client.urls == [engine.url] and client.dead == {frozen.url: "no /health answer within 0.5s"}
    frozen.sock.close()


def test_stream_cut_by_a_dying_engine_keeps_its_prefix_and_resumes_elsewhere(engine, tiny_ckpt):
    from streamrl.config import default_args
    from streamrl.rollout.generate import generate_streaming
    from streamrl.types import Sample, Status

    meta = {"weight_version": "3", "output_token_logprobs": [[-0.5, 9, None], [-0.25, 10, None]]}
    events = [{"text": "", "output_ids": [9], "meta_info": {**meta, "output_token_logprobs": meta[
        "output_token_logprobs"][:1]}}, {"text": "", "output_ids": [9, 10], "meta_info": meta}]
    dying = DiesMidStream(events)
    client = EngineClient([dying.url, engine.url], retries=1, retry_wait=0.001)
    args = default_args(hf_checkpoint=tiny_ckpt)
    sample = Sample(tokens=[5, 6, 7])

    async def run():
        await generate_streaming(args, sample, GREEDY, client=client)
        assert sample.status == Status.ABORTED and sample.tokens == [5, 6, 7, 9, 10]  # the prefix it had
        assert sample.rollout_log_probs == [-0.5, -0.25]
        await generate_streaming(args, sample, {**GREEDY, "max_new_tokens": 2}, client=client)  # the resume
        await client.aclose()

    anyio.run(run)
    assert sample.status == Status.TRUNCATED and sample.response_length == 4 and sample.tokens[:5] == [5, 6, 7, 9, 10]
    assert list(client.dead) == [dying.url] and client.urls == [engine.url]


def test_fan_out_skips_a_dead_engine_and_no_engine_left_names_the_causes(engine):
    dead = closed_port_url()
    client = EngineClient([engine.url, dead], retries=1, retry_wait=0.001)

    async def run():
        await client.pause("in_place")  # no error for the dead one: it is dropped
        assert httpx.get(engine.url + "/server_info").json()["internal_states"][0]["paused"]
        await client.resume()
        await client.aclose()

    anyio.run(run)
    assert client.urls == [engine.url] and list(client.dead) == [dead]
    only_dead = EngineClient([dead], retries=1, retry_wait=0.001)
    with pytest.raises(NoEngineError, match=rf"every worker was removed.*{dead}: .*ConnectError") as exc:
        anyio.run(only_dead.generate, {"input_ids": [1]})
    assert not isinstance(exc.value, EngineError)  # fatal for the producers, not one more failed group


def _drop_if_dead(urls: list[str]):
    """What EnginePool.drop does for sync_weights, without Ray: remove the URL if /health does not answer."""
    def on_dead(url: str, cause: str) -> bool:
        try:
            if httpx.get(url + "/health", timeout=5).is_success:
                return False
        except httpx.HTTPError:
            pass
        urls.remove(url)
        return True

    return on_dead


def _paused(url: str) -> bool:
    return httpx.get(url + "/server_info").json()["internal_states"][0]["paused"]


def test_sync_goes_on_without_an_engine_that_is_dead_at_pause(engine):
    dead = closed_port_url()
    urls, pushed = [dead, engine.url], []
    sync_weights(urls, push=lambda: pushed.append(list(urls)), publish=lambda: None, on_dead=_drop_if_dead(urls))
    assert urls == [engine.url] and pushed == [[engine.url]] and not _paused(engine.url)
    with pytest.raises(ConnectionError, match=dead):  # without on_dead a dead engine still fails the sync
        sync_weights([dead, engine.url], push=lambda: None, publish=lambda: None)
    assert not _paused(engine.url)


def test_sync_goes_on_when_an_engine_dies_after_the_publish(engine, tiny_ckpt):
    other = EmbeddedEngine(tiny_ckpt).start()
    urls = [engine.url, other.url]
    try:  # killed once the new version is out: its /continue_generation is refused, the others still continue
        sync_weights(urls, push=lambda: None, publish=other.stop, on_dead=_drop_if_dead(urls))
    finally:
        other.stop()
    assert urls == [engine.url] and not _paused(engine.url)


def test_sync_pushes_again_when_an_engine_dies_during_the_push(engine, tiny_ckpt):
    other = EmbeddedEngine(tiny_ckpt).start()
    urls, pushed, staged = [engine.url, other.url], [], []

    def push():  # like FSDPTrainRank.push_staged: a push consumes what was staged
        assert staged.pop() == "weights", "push without a stage"
        pushed.append(list(urls))
        if len(pushed) == 1:
            other.stop()  # dies after its pause
            raise RuntimeError(f"engine {other.url}: weight update failed: connection refused")

    try:
        sync_weights(urls, push=push, publish=lambda: None, on_dead=_drop_if_dead(urls),
                     stage=lambda: staged.append("weights"))
    finally:
        other.stop()
    assert urls == [engine.url] and pushed == [[engine.url, other.url], [engine.url]] and staged == []
    assert not _paused(engine.url)
