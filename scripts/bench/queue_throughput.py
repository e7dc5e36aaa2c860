"""Buffer throughput, end to end: `ray.util.queue.Queue` one sample per call vs the RolloutBuffer actor, batched.
(Named queue_throughput.py, not queue.py: a file named queue.py in scripts/bench shadows the standard library's
`queue` for every script run from that folder, and torch imports it.)


    producer (a Ray actor: its own process) -> queue / buffer actor -> consumer (this driver process)

Samples are real `Sample`s of 512 tokens (64 prompt + 448 response) with per-token log-probs and versions and a
reward, in groups of 8; every group gets a fresh group_id, so the buffer's ledger tracks each one. Paths:
  * queue:   `ray.util.queue.Queue`, `put(sample)` / `get()` one sample per call (the baseline);
  * objects: `RolloutBuffer.put(groups)` / `get(n)`: batches of Sample objects, pickled by Ray;
  * encoded: `put_encoded(encode_batch(groups))` / `get_encoded(n)`: msgpack bytes with their metadata beside them,
    which the buffer never decodes: the path the producers and the driver take in a job
    (`RolloutManager._queue`, `pipelines/health.get_batch`);
  * encoded_decoded: the same, the consumer also decoding every batch into Samples inside the timed loop (as the
    driver does before it builds the train batch).
The producer encodes inside the timed loop; `producer_alone_samples_per_s` is its own ceiling (encoding only). The
buffer's ledger is checked after each run. Each figure is the best of `--repeats` runs (the paths interleaved),
since other work on a small shared machine comes and goes. Prints one JSON line; `ratio` = encoded / queue.

    python scripts/bench/queue_throughput.py [--seconds 1.5] [--repeats 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:  # this file is named queue.py: unshadow the stdlib
    sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402

GROUP, PROMPT, RESPONSE = 8, 64, 448
PER_CALL = 128  # groups per put/get call: 1,024 samples, ~7.5 MB encoded (Ray moves big objects faster per byte)


def make_group(gid: str, rng: random.Random, version: int = 0) -> list:
    from streamrl.types import Sample

    out = []
    for i in range(GROUP):
        s = Sample(group_id=gid, index=i, prompt="q" * 40, tokens=[rng.randrange(150_000) for _ in range(PROMPT)])
        s.append_response_tokens(tokens=[rng.randrange(150_000) for _ in range(RESPONSE)],
                                 log_probs=[-rng.random() for _ in range(RESPONSE)], version=version,
                                 finish_reason="stop")
        s.reward = float(rng.random() < 0.5)
        out.append(s)
    return out


class Producer:
    """Holds PER_CALL template groups; each batch re-labels them with new group ids and sends them."""

    def __init__(self) -> None:
        rng = random.Random(0)
        self.templates = [make_group(f"t{i}", rng) for i in range(PER_CALL)]

    def ready(self) -> bool:
        return True

    def _batch(self, b: int) -> list:
        for i, g in enumerate(self.templates):
            for s in g:
                s.group_id = f"b{b}-{i}"
        return self.templates

    async def to_buffer(self, buf, batches: int, mode: str, inflight: int = 2) -> int:
        from streamrl.wire import encode_batch

        send = {"objects": lambda g: buf.put.remote(g),
                "encoded": lambda g: buf.put_encoded.remote(encode_batch(g))}[mode]
        refs: deque = deque()
        for b in range(batches):  # every path serializes before returning: re-labelling the templates is safe
            refs.append(send(self._batch(b)))
            if len(refs) >= inflight:
                await refs.popleft()
        for r in refs:
            await r
        return batches

    def alone(self, batches: int) -> float:
        """The producer's own ceiling: encoding only, no buffer, no consumer (samples/s)."""
        from streamrl.wire import encode_batch

        t0 = time.perf_counter()
        for b in range(batches):
            encode_batch(self._batch(b))
        return batches * PER_CALL * GROUP / (time.perf_counter() - t0)

    def to_queue(self, q, n: int) -> int:
        samples = [s for g in self.templates for s in g]
        for i in range(n):
            q.put(samples[i % len(samples)])
        return n


def bench_queue(ray, producer, n: int) -> float:
    from ray.util.queue import Queue

    q = Queue(actor_options={"num_cpus": 0})
    q.put(0)
    q.get()  # the queue actor is up
    t0 = time.perf_counter()
    ref = producer.to_queue.remote(q, n)
    got = [q.get() for _ in range(n)]
    dt = time.perf_counter() - t0
    assert ray.get(ref) == n and len(got[-1].tokens) == PROMPT + RESPONSE
    q.shutdown()
    return n / dt


def bench_buffer(ray, producer, batches: int, mode: str, decode: bool) -> float:
    from buffers import decode_batch, make_buffer_actor
    from streamrl.config import default_args

    args = default_args(async_buffer_size=4 * PER_CALL, max_staleness=1, stale_policy="drop",
                        n_samples_per_prompt=GROUP, rollout_batch_size=PER_CALL)
    buf = make_buffer_actor(args)
    ray.get(buf.size.remote())
    get = {"objects": buf.get, "encoded": buf.get_encoded}[mode]
    t0 = time.perf_counter()
    prod = producer.to_buffer.remote(buf, batches, mode)
    pending, samples = get.remote(PER_CALL, 0), 0
    for step in range(batches):
        out = ray.get(pending)
        if step + 1 < batches:  # the next get runs in the actor while this batch is handled here
            pending = get.remote(PER_CALL, step + 1)
        if decode:
            out = decode_batch(out)
        samples += sum(len(g) for g in out) if not isinstance(out, bytes) else PER_CALL * GROUP
    dt = time.perf_counter() - t0
    ray.get(prod)
    last = out if not isinstance(out, bytes) else decode_batch(out)
    assert len(last) == PER_CALL and len(last[0][0].tokens) == PROMPT + RESPONSE
    counts = ray.get(buf.check_ledger.remote())
    assert counts["trained"] == batches * PER_CALL and counts["queued"] == 0, counts
    ray.kill(buf)
    return samples / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.5, help="rough time per path and repeat")
    p.add_argument("--repeats", type=int, default=2, help="report the best of this many runs of each path")
    a = p.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        producer = ray.remote(num_cpus=0)(Producer).remote()
        ray.get(producer.ready.remote())
        sample = PER_CALL * GROUP

        def sized(rate_guess: float) -> int:  # batches for about `seconds` at the guessed rate
            return max(4, int(a.seconds * rate_guess / sample))

        paths = {"ray_queue": lambda: bench_queue(ray, producer, max(500, int(a.seconds * 400))),
                 "producer_alone": lambda: ray.get(producer.alone.remote(sized(50_000))),
                 "objects": lambda: bench_buffer(ray, producer, sized(5_000), "objects", False),
                 "encoded": lambda: bench_buffer(ray, producer, sized(40_000), "encoded", False),
                 "encoded_decoded": lambda: bench_buffer(ray, producer, sized(20_000), "encoded", True)}
        bench_buffer(ray, producer, 4, "encoded", False)  # warm-up: imports, first actor
        r = {k: 0.0 for k in paths}
        for _ in range(a.repeats):  # best of N, paths interleaved: this machine's load comes and goes
            for k, fn in paths.items():
                r[k] = max(r[k], fn())
        q = r["ray_queue"]
    finally:
        ray.shutdown()
    print(json.dumps({
        "sample_tokens": PROMPT + RESPONSE, "group_size": GROUP, "groups_per_call": PER_CALL,
        **{f"{k}_samples_per_s": round(v) for k, v in r.items()},
        "ratio": round(r["encoded"] / q, 1), "encoded_vs_objects": round(r["encoded"] / r["objects"], 1),
        **{f"ratio_{k}": round(r[k] / q, 1) for k in ("objects", "encoded_decoded")},
        "target_met": r["encoded"] >= 50 * q, "best_of": a.repeats, "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
