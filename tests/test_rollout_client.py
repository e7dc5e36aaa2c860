"""EngineClient: bounded retries (only where safe), errors that name the URL, streaming, worker list changes."""

import socket
import threading

import anyio
import pytest

from streamrl.rollout.client import EngineClient, EngineError, NoEngineError


class Hangup:
    """A TCP server that accepts each connection, reads the request and closes without answering."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.requests: list[str] = []  # "POST /generate", ...
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.requests.append(" ".join(conn.recv(65536).decode(errors="replace").split(" ")[:2]))
            conn.close()


def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_connection_refused_is_retried_then_names_the_url():
    url = closed_port_url()
    client = EngineClient([url], retries=2, retry_wait=0.001)
    with pytest.raises(NoEngineError, match=rf"{url}: POST /generate failed 3 times.*ConnectError"):
        anyio.run(client.generate, {"input_ids": [1]})


def test_generate_is_not_retried_after_sending_but_idempotent_calls_are():
    srv = Hangup()
    client = EngineClient([srv.url], retries=2, retry_wait=0.001)
    with pytest.raises(NoEngineError, match="not retried: not idempotent"):  # and it was the only engine
        anyio.run(client.generate, {"input_ids": [1]})
    # generating twice on one engine would waste (or duplicate) a sample; the health probe then found it dead
    assert srv.requests == ["POST /generate", "GET /health"] and list(client.dead) == [srv.url]
    client = EngineClient([srv.url], retries=2, retry_wait=0.001)
    with pytest.raises(EngineError, match=rf"{srv.url}: GET /v1/loads\?include=core failed 3 times"):
        anyio.run(client.loads, srv.url)
    assert srv.requests[2:] == ["GET /v1/loads?include=core"] * 3
    srv.sock.close()


def test_streaming_weight_versions_loads_and_workers(tiny_ckpt):
    from streamrl.engine.actor import EmbeddedEngine

    with EmbeddedEngine(tiny_ckpt, weight_version="4") as eng:
        async def run():
            client = EngineClient([eng.url])
            events = [e async for e in client.generate_stream({
                "input_ids": [5, 6], "return_logprob": True,
                "sampling_params": {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}})]
            assert [len(e["output_ids"]) for e in events][-1] == 3
            assert await client.weight_versions() == {eng.url: "4"}
            assert await client.loads(eng.url) == {"num_running_reqs": 0, "num_waiting_reqs": 0}
            assert await client.health() and not await client.health(closed_port_url())
            await client.wait_idle(timeout=10)
            client.remove_worker(eng.url)
            with pytest.raises(NoEngineError, match="no engine"):
                await client.generate({"input_ids": [1]})
            client.add_worker(eng.url)
            assert (await client.generate({"input_ids": [5], "sampling_params": {"max_new_tokens": 1}}))["meta_info"]
            await client.aclose()

        anyio.run(run)


def test_requests_spread_over_small_connection_pools():
    """256 connections become 8 pools of 32 (httpcore's per-request scan is quadratic in one big pool); each request
    leases the least loaded pool and gives it back, whatever happens to the request."""
    c = EngineClient(["http://127.0.0.1:1"], max_connections=256)
    assert len(c._pools) == 8 and all(p._transport._pool._max_connections == 32 for p in c._pools)
    with c._lease() as a, c._lease() as b:
        assert a is not b and sorted(c._pool_load) == [0] * 6 + [1, 1]
    with pytest.raises(RuntimeError), c._lease():
        raise RuntimeError
    assert c._pool_load == [0] * 8
    assert len(EngineClient(["http://127.0.0.1:1"], max_connections=20)._pools) == 1
    anyio.run(c.aclose)
