"""Decode step of the slot KV cache: varlen FlashAttention (each slot reads its own length) vs masked SDPA over the
length bucket, side by side on the same model and cache (one JSON line per case).

Model: random-init Qwen3-0.6B shape, bf16 on CUDA, slot cache of 1024 positions. Cases: every row at the same length
("uniform"), and a long-tailed batch where most rows are short and a few are long ("long_tail": what continuous
batching of RL rollouts looks like, and where SDPA makes every row read the longest row's width).

    python3 -P scripts/bench/decode_attention.py [--batches 64 256] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch

    from streamrl.engine.static_kv import StaticKV
    from streamrl.models.tiny import bench_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="*", default=[64, 256])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-len", type=int, default=1024)
    a = p.parse_args()
    model, _, _ = bench_model("qwen3-0.6b", max_positions=4096)  # bf16 on the GPU
    gen = torch.Generator().manual_seed(1)

    def lengths(case: str, b: int) -> list[int]:
        if case == "uniform":
            return [a.max_len // 4] * b
        # log-normal around 96 tokens, a few rows near the end of the cache
        x = torch.exp(torch.randn(b, generator=gen) * 0.8 + 4.56).clamp(16, a.max_len - a.steps - 8)
        x[: max(1, b // 64)] = a.max_len - a.steps - 8
        return [int(v) for v in x]

    @torch.inference_mode()
    def ms_per_step(mode: str, lens: list[int]) -> float:
        kv = StaticKV(model, slots=len(lens), max_len=a.max_len, decode_attention=mode)
        kv.rows = [object()] * len(lens)
        for _ in range(3):  # capture + warm
            kv.lens = list(lens)
            kv._decode([1] * len(lens))
        kv.lens = list(lens)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            kv._decode([1] * len(lens))
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t) / a.steps
        del kv
        torch.cuda.empty_cache()
        return ms

    for b in a.batches:
        for case in ("uniform", "long_tail"):
            lens = lengths(case, b)
            sdpa, flash = ms_per_step("sdpa", lens), ms_per_step("flash", lens)
            print(json.dumps({"bench": "decode_attention", "device": torch.cuda.get_device_name(), "batch": b,
                              "case": case, "mean_len": round(sum(lens) / b), "max_len": max(lens),
                              "sdpa_ms_per_step": round(sdpa, 3), "flash_ms_per_step": round(flash, 3),
                              "speedup": round(sdpa / flash, 2)}), flush=True)


if __name__ == "__main__":
    main()
