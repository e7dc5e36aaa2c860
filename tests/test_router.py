"""The real sglang-router (the `sglang-router` package) in front of two embedded engines on CPU.

The engines report different weight versions ("0" and "7"), so every response says which worker served it.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("sglang_router")

from streamrl.config import default_args  # noqa: E402
from streamrl.rollout.client import EngineClient  # noqa: E402
from streamrl.rollout.sglang.router import (  # noqa: E402
    add_worker,
    list_workers,
    remove_worker,
    start_router,
    wait_workers,
)

GREEDY = {"max_new_tokens": 3, "temperature": 0.0}


@pytest.fixture(scope="module")
def cluster(tiny_ckpt, tmp_path_factory):
    from streamrl.engine.actor import EmbeddedEngine

    e1 = EmbeddedEngine(tiny_ckpt, weight_version="0").start()
    e2 = EmbeddedEngine(tiny_ckpt, weight_version="7").start()
    args = default_args(use_router=True, router_policy="round_robin", rollout_engine_startup_timeout=60)
    router = start_router(args, [e1.url], log_path=str(tmp_path_factory.mktemp("router") / "router.log"))
    try:
        yield router.url, e1, e2
    finally:
        router.stop()
        e1.stop()
        e2.stop()


def served_by(router_url, n):
    with httpx.Client(timeout=60) as c:
        return [c.post(router_url + "/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY}).json()
                ["meta_info"]["weight_version"] for _ in range(n)]


def test_add_and_remove_worker_at_run_time(cluster):
    url, e1, e2 = cluster
    assert set(served_by(url, 4)) == {"0"}
    add_worker(url, e2.url, timeout=60)
    assert {w["url"] for w in list_workers(url)} == {e1.url, e2.url}
    assert set(served_by(url, 6)) == {"0", "7"}  # round robin over both engines
    remove_worker(url, e2.url, timeout=60)
    assert set(served_by(url, 4)) == {"0"}


def test_dp_aware_router_registers_the_engine_per_dp_rank(cluster, tmp_path):
    """sglang-router --dp-aware reads dp_size from /get_server_info ("No dp_size in response" otherwise) and lists
    the worker as URL@rank; streamrl's helpers and client map that back to the engine's URL."""
    _, e1, e2 = cluster
    args = default_args(use_router=True, router_dp_aware=True, router_policy="round_robin",
                        rollout_engine_startup_timeout=60)
    router = start_router(args, [e1.url], log_path=str(tmp_path / "router.log"))
    try:
        workers = list_workers(router.url)
        assert [w["url"] for w in workers] == [e1.url + "@0"]
        assert workers[0]["metadata"]["dp_size"] == "1"
        assert set(served_by(router.url, 2)) == {"0"}
        add_worker(router.url, e2.url)
        assert sorted(w["url"] for w in list_workers(router.url)) == sorted([e1.url + "@0", e2.url + "@0"])
        assert set(served_by(router.url, 4)) == {"0", "7"}
        client = EngineClient([], router_url=router.url)
        assert sorted(asyncio.run(client.refresh_workers())) == sorted([e1.url, e2.url])
        # (removing a dp-aware worker fails inside sglang-router 0.3.2: "No workers found with prefix URL@0@")
    finally:
        router.stop()


def test_batched_generate_through_the_router(cluster):
    url, _, _ = cluster
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    outs = httpx.post(url + "/generate", json={"input_ids": prompts, "sampling_params": GREEDY,
                                               "return_logprob": True}, timeout=60).json()
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 2, 4]
    assert all(len(o["meta_info"]["output_token_logprobs"]) == len(o["output_ids"]) for o in outs)
    # What the router's schema refuses (so producers send one sampling_params dict and no rid list):
    bad = httpx.post(url + "/generate", json={"input_ids": prompts, "sampling_params": [GREEDY] * 3}, timeout=60)
    assert bad.status_code == 422
    # and what it does not proxy: abort goes to each worker
    assert httpx.post(url + "/abort_request", json={"abort_all": True}).status_code == 404


def test_abort_reaches_a_request_routed_through_the_router(cluster):
    url, e1, _ = cluster
    httpx.post(e1.url + "/pause_generation", json={"mode": "in_place"}).raise_for_status()
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: httpx.post(url + "/generate", timeout=60, json={
                "input_ids": [5, 6, 7], "return_logprob": True,
                "sampling_params": {"max_new_tokens": 100, "temperature": 0.0, "ignore_eos": True}}).json())
            while e1.scheduler.load()["num_running_reqs"] + e1.scheduler.load()["num_waiting_reqs"] == 0:
                assert not fut.done(), fut.result()  # polling until the routed request reached the worker
            client = EngineClient([e1.url], router_url=url)
            asyncio.run(client.abort())  # to the workers, not the router
            out = fut.result(timeout=60)
    finally:
        httpx.post(e1.url + "/continue_generation", json={})
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) < 100


def test_streamed_abort_through_the_router_keeps_a_coherent_prefix(cluster, tiny_ckpt):
    from streamrl.rollout.generate import apply_output, generate_streaming
    from streamrl.types import Sample, Status

    url, e1, _ = cluster
    args = default_args(hf_checkpoint=tiny_ckpt)

    async def run():
        client = EngineClient([e1.url], router_url=url)
        sample = Sample(tokens=[5, 6, 7])
        params = {"max_new_tokens": 100, "temperature": 0.0, "ignore_eos": True}
        seen, aborted = [], False

        async def first_tokens_then_abort():
            nonlocal aborted
            async for event in client.generate_stream({"input_ids": [5, 6, 7], "sampling_params": params,
                                                           "return_logprob": True}):
                seen.append(event)
                if event["output_ids"] and not aborted:
                    aborted = True
                    await client.pause("in_place")  # freeze it mid-generation, then abort: deterministic
                    await client.abort()
                    await client.resume()

        await first_tokens_then_abort()
        await client.resume()
        last = seen[-1]
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(last["output_ids"]) < 100
        apply_output(sample, last)  # what generate_streaming keeps when its stream is aborted
        prefix = list(sample.tokens)
        assert sample.status == Status.ABORTED and sample.response_length == len(last["output_ids"])
        await generate_streaming(args, sample, {**params, "max_new_tokens": 2}, client=client)  # resume
        assert sample.status == Status.TRUNCATED and sample.tokens[: len(prefix)] == prefix
        assert sample.response_length == len(last["output_ids"]) + 2 and len(sample.weight_versions) == 2
        await client.aclose()

    asyncio.run(run())


_DRIVER = """
import json, sys, time
from streamrl.config import default_args
from streamrl.rollout.sglang.router import start_router
r = start_router(default_args(use_router=True, rollout_engine_startup_timeout=60), [], log_path=sys.argv[1])
print(json.dumps({"pid": r.proc.pid, "port": r.port, "argv": r.argv}), flush=True)
time.sleep(3600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for its new parent to reap it
    except FileNotFoundError:
        return True


def test_router_binds_loopback_only_and_dies_with_its_parent(tmp_path):
    """A driver starts the router and is SIGKILLed (no stop(), no finally): the router must not outlive it."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from netutil import listening, process_tree

    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "router.log")], stdout=subprocess.PIPE,
                              text=True)
    router_pid = None
    try:
        info = json.loads(driver.stdout.readline() or "null")
        assert info is not None, f"driver exited ({driver.wait()}): {(tmp_path / 'router.log').read_text()[-2000:]}"
        router_pid = info["pid"]
        prometheus = int(info["argv"][info["argv"].index("--prometheus-port") + 1])
        socks = listening(process_tree(router_pid))
        assert {s[2] for s in socks} >= {info["port"], prometheus}
        assert {s[1] for s in socks} == {"127.0.0.1"}
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        for _ in range(600):  # polling a condition (bounded so that a surviving router fails the test)
            if _gone(router_pid):
                break
            time.sleep(0.05)
        assert _gone(router_pid), f"router {router_pid} outlived its parent"
    finally:
        driver.kill()
        driver.wait()
        if router_pid is not None and not _gone(router_pid):
            os.kill(router_pid, signal.SIGKILL)


def test_a_dead_worker_behind_the_router_is_deregistered_and_its_requests_served(cluster, tiny_ckpt):
    """A worker behind the router dies: the router's own retries serve every request from the live worker, and the
    client, finding it dead on its fan-out (abort goes to every worker), takes it out of the router too."""
    from streamrl.engine.actor import EmbeddedEngine

    url, e1, _ = cluster
    e3 = EmbeddedEngine(tiny_ckpt, weight_version="9").start()
    add_worker(url, e3.url, timeout=60)
    e3.stop()

    async def run():
        client = EngineClient([e1.url, e3.url], router_url=url, retries=1, retry_wait=0.001)
        outs = [await client.generate({"input_ids": [5, 6, 7], "sampling_params": GREEDY}) for _ in range(4)]
        await client.abort()  # no error for the dead worker: dropped
        await client.aclose()
        return client, [o["meta_info"]["weight_version"] for o in outs]

    client, served = asyncio.run(run())
    assert served == ["0"] * 4
    assert client.urls == [e1.url] and list(client.dead) == [e3.url]
    wait_workers(url, absent=[e3.url], timeout=30)  # the router removes a worker asynchronously (202)
    assert [w["url"] for w in list_workers(url)] == [e1.url]
