"""Profile the FSDP trainer alone on a GPU: where a step of the long-tail benchmark job goes.

Same model (random-init Qwen3-0.6B shape), flags and batch shape as `scripts/bench/async_vs_sync_gpu.py --job
long_tail` (256 samples, 40-token prompts, log-normal response lengths from long_tail.py, token-budget
micro-batches), no engine. Prints one JSON line (s/step, tokens, achieved TFLOP/s) and the torch profiler's top
CUDA kernels and CPU ops of one step; writes both tables to --out.

    python3 -P scripts/gpu/profile_train_step.py [--steps 3] [--flags="--max-tokens-per-gpu 6144"] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts" / "bench")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--flags", default="", help="extra trainer flags")
    p.add_argument("--out", default="runs/profile_train")
    p.add_argument("--model", default=None, help="HF checkpoint (default: the benchmark's 0.6B model)")
    p.add_argument("--samples", type=int, default=256)
    a = p.parse_args()
    import torch
    from async_vs_sync_gpu import prepare
    from long_tail import target_length
    from torch.profiler import ProfilerActivity, profile

    from streamrl.config import parse_args
    from streamrl.train.batch import TrainBatch
    from streamrl.train.fsdp import FSDPTrainRank

    out = ROOT / a.out
    model = a.model or str(prepare(ROOT / "runs" / "bench_gpu" / "data") / "model")
    args = parse_args(["--hf-checkpoint", model, "--bf16", "--use-dynamic-batch-size",
                       "--max-tokens-per-gpu", "6144", "--micro-batch-size", "32", "--use-tis", "--lr", "1e-6",
                       "--rollout-max-response-len", "768", "--rollout-batch-size", str(a.samples // 8),
                       "--n-samples-per-prompt", "8", "--async-buffer-size", str(a.samples // 8),
                       "--actor-num-gpus-per-node", "1", *a.flags.split()])
    rank = FSDPTrainRank(args, 0, 1)
    rank.init(*rank.master_address(), shares_gpu=True)
    rng = random.Random(0)
    vocab = 50  # any token ids: the cost does not depend on them
    n = a.samples
    resp = [target_length(i, 768) for i in range(n)]
    tokens = [[rng.randrange(vocab) for _ in range(40 + r)] for r in resp]
    batch = TrainBatch(tokens=tokens, prompt_lengths=[40] * n, response_lengths=resp,
                       loss_masks=[[1] * r for r in resp], rollout_log_probs=[[-1.0] * r for r in resp],
                       advantages=[rng.gauss(0, 1) for _ in resp], rewards=[0.0] * n, staleness=[0] * n)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        rank.train_step(batch)
    sync()
    t0 = time.time()
    parts = [rank.train_step(batch) for _ in range(a.steps)]
    s_per_step = (time.time() - t0) / a.steps
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        rank.train_step(batch)
        sync()
    n_tok = sum(len(t) for t in tokens)
    params = sum(x.numel() for x in rank.model.parameters())
    line = {"bench": "train_step_profile", "device": torch.cuda.get_device_name() if cuda else "cpu", "samples": n,
            "tokens": n_tok,            "response_tokens": sum(resp), "s_per_step": round(s_per_step, 3),
            "fwd_bwd_s": round(sum(x["train_fwd_bwd_time"] for x in parts) / len(parts), 3),
            "tflops_6nd": round(6 * params * n_tok / s_per_step / 1e12, 1), "flags": a.flags}
    print(json.dumps(line), flush=True)
    avg = prof.key_averages()
    by_cuda = avg.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30, max_name_column_width=90)
    by_cpu = avg.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=90)
    print(by_cuda, by_cpu, sep="\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text(json.dumps(line) + "\n" + by_cuda + "\n" + by_cpu)
    rank.shutdown()


if __name__ == "__main__":
    main()
