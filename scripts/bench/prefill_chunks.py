"""Prefill of many newcomers with long-tailed lengths: one padded batch vs batches of --sglang-max-prefill-tokens
padded tokens, longest first (what the engine does after an in-place weight update, when every running request is
re-prefilled, or when a wave of partial rollouts is resubmitted). Same model and rows, side by side; one JSON line.

Runs on the slot cache (StaticKV): eager on CPU, bf16 on CUDA (`--preset qwen3-0.6b` for the issue's model).

    python3 scripts/bench/prefill_chunks.py [--rows 64] [--budget 4096] [--preset tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time


def main() -> None:
    import torch

    from streamrl.engine.kv import prefill_chunks
    from streamrl.engine.static_kv import StaticKV
    from streamrl.models.tiny import bench_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--budget", type=int, default=4096)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    model, dev, _ = bench_model(a.preset, max_positions=2048)
    rnd = random.Random(0)
    lens = [int(min(1000, max(24, 96 * math.exp(0.9 * rnd.gauss(0, 1))))) for _ in range(a.rows)]

    class Row:
        def __init__(self, n: int):
            self.prompt_ids, self.output_ids = [rnd.randrange(5, 80) for _ in range(n)], []

    rows = [Row(n) for n in lens]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    @torch.inference_mode()
    def timed(budget: int | None) -> float:
        best = float("inf")
        for _ in range(a.repeat):
            kv = StaticKV(model, slots=a.rows, max_len=1024, use_graphs=False, max_prefill_tokens=budget)
            sync()
            t = time.perf_counter()
            kv.step(rows)
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    one, chunked = timed(None), timed(a.budget)
    chunks = prefill_chunks(rows, a.budget)
    padded = [len(c) * max(len(r.prompt_ids) for r in c) for c in chunks]
    print(json.dumps({
        "bench": "prefill_chunks", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "preset": a.preset, "rows": a.rows, "real_tokens": sum(lens), "mean_len": round(sum(lens) / a.rows),
        "max_len": max(lens), "budget": a.budget, "chunks": len(chunks),
        "padded_tokens_one_batch": a.rows * max(lens), "padded_tokens_chunked": sum(padded),
        "s_one_batch": round(one, 4), "s_chunked": round(chunked, 4), "speedup": round(one / chunked, 2)}), flush=True)


if __name__ == "__main__":
    main()
