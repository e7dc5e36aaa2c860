"""Engine decode throughput with and without the KV cache, on the tiny model, one CPU thread.

    .venv/bin/python scripts/bench/engine_kv_cache.py [--requests 128 --prompt-len 12 --new-tokens 8 --repeats 3]

Drives the `Scheduler` directly (no HTTP): all requests are queued while paused and released together, and the clock
runs until the last one finishes. Both modes run in the same process on the same model and prompts; each takes the
best of `--repeats` runs after one warm-up. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time

import torch

from streamrl.engine.actor import load_model
from streamrl.engine.protocol import SamplingParams
from streamrl.engine.scheduler import Request, Scheduler
from streamrl.models.tiny import build_tiny_model


def run_once(model, vocab: int, prompts: list[list[int]], new_tokens: int, kv_cache: bool) -> float:
    """Seconds for the scheduler to generate `new_tokens` for every prompt (greedy, eos ignored)."""
    sch = Scheduler(model, vocab_size=vocab, max_positions=1 << 20, kv_cache=kv_cache, max_running_requests=1 << 16)
    done = threading.Semaphore(0)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sch.pause("in_place")
    sch.start()
    try:
        for i, p in enumerate(prompts):
            sch.submit(Request(f"r{i}", p, params, on_event=lambda _out: done.release()))
        t0 = time.perf_counter()
        sch.resume()
        for _ in prompts:
            done.acquire()
        return time.perf_counter() - t0
    finally:
        sch.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        model = load_model(str(build_tiny_model(d)))
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    tokens = args.requests * args.new_tokens
    best = {}
    for kv_cache in (True, False):
        run_once(model, vocab, prompts[:8], args.new_tokens, kv_cache)  # warm-up
        best[kv_cache] = min(run_once(model, vocab, prompts, args.new_tokens, kv_cache) for _ in range(args.repeats))
    cache, recompute = tokens / best[True], tokens / best[False]
    print(json.dumps({
        "bench": "engine_kv_cache", "tok_per_s_cache": round(cache, 1), "tok_per_s_recompute": round(recompute, 1),
        "speedup": round(cache / recompute, 3), "requests": args.requests, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
