"""The producers' HTTP client under hundreds of requests in flight: one httpx pool vs several small pools.

A stand-in engine (a separate process) answers every POST /generate after `--latency` seconds with a response the
size of a 120-token answer with log-probs. The client (EngineClient with 256 connections, as the producers use it)
keeps `--in-flight` requests going until `--requests` are done (more than its connections, as when 64 groups of 8
per-sample requests are in flight), once with a single pool of 256 connections and once with the default pools of
32; prints one JSON line with the client's CPU seconds per 1000 requests, the throughput, and the ratios. httpcore
scans queued requests x connections whenever a request is assigned: quadratic in one big pool.

    python3 scripts/bench/client_concurrency.py [--in-flight 512] [--requests 3000] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SERVER = """
import sys, anyio, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
latency = float(sys.argv[2])
body = ('{"text": "", "output_ids": [%s], "meta_info": {"id": "x", "weight_version": "0", "finish_reason": '
        '{"type": "length"}, "output_token_logprobs": [%s]}}' % (
            ",".join(["12345"] * 120), ",".join(["[-1.2345678, 12345, null]"] * 120))).encode()
async def generate(request):
    await request.body()
    await anyio.sleep(latency)
    return Response(body, media_type="application/json")
async def health(request):
    return Response(b"{}", media_type="application/json")
app = Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", backlog=4096)
"""


def main() -> None:
    import anyio
    import httpx

    from streamrl.net import free_port
    from streamrl.rollout.client import EngineClient

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-flight", type=int, default=512)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--latency", type=float, default=0.2)
    a = p.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(a.latency)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/health", timeout=1.0)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        payload = {"input_ids": list(range(400)), "sampling_params": {"max_new_tokens": 120},
                   "return_logprob": True}

        async def drive(per_pool: int) -> dict:
            client = EngineClient([url], max_connections=a.connections, connections_per_pool=per_pool)
            left = a.requests

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await client.generate(payload)

            c0, t0 = time.process_time(), time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(a.in_flight):
                    tg.start_soon(worker)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            await client.aclose()
            return {"cpu_s_per_1k": 1e3 * cpu / a.requests, "req_per_s": a.requests / wall}

        one = anyio.run(drive, a.connections)
        many = anyio.run(drive, 32)
    finally:
        server.terminate()
        server.wait()
    print(json.dumps({
        "bench": "client_concurrency", "in_flight": a.in_flight, "connections": a.connections, "requests": a.requests,
        "latency_s": a.latency, "one_pool_cpu_s_per_1k": round(one["cpu_s_per_1k"], 3),
        "pools_of_32_cpu_s_per_1k": round(many["cpu_s_per_1k"], 3),
        "one_pool_req_per_s": round(one["req_per_s"]), "pools_of_32_req_per_s": round(many["req_per_s"]),
        "cpu_ratio": round(one["cpu_s_per_1k"] / many["cpu_s_per_1k"], 2),
        "throughput_ratio": round(many["req_per_s"] / one["req_per_s"], 2)}), flush=True)


if __name__ == "__main__":
    main()
