"""Train step time with fixed micro-batches vs `--use-dynamic-batch-size` on long-tailed response lengths.

The real FSDP2 rank (gloo, world 1, CPU) on the tiny Qwen3, one batch of 64 samples whose responses are long-tailed
(7 of 8 short, 1 of 8 long, as in reasoning RL) and shuffled as groups arrive. Fixed: --micro-batch-size 8 (each
micro-batch padded to its longest sample). Dynamic: --max-tokens-per-gpu = the same 8 x mean sequence length, longest
first. Both steps give the same gradient (tests/algos/test_invariance.py); measured: padded tokens and seconds
per step, interleaved, median of --reps. One JSON line.

    python scripts/bench/dynamic_batch.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time


def main() -> None:
    import torch

    from streamrl.config import default_args
    from streamrl.models.tiny import build_tiny_model
    from streamrl.train.batch import TrainBatch
    from streamrl.train.fsdp import FSDPTrainRank
    from streamrl.train.step import micro_batches

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--samples", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    ckpt = str(build_tiny_model(tempfile.mkdtemp() + "/m"))
    g = random.Random(0)
    n = a.samples
    plen = [g.randint(8, 16) for _ in range(n)]
    rlen = [g.randint(160, 220) if i % 8 == 0 else g.randint(8, 24) for i in range(n)]
    order = list(range(n))
    g.shuffle(order)
    plen, rlen = [plen[i] for i in order], [rlen[i] for i in order]
    batch = TrainBatch(tokens=[[g.randint(5, 60) for _ in range(p + r)] for p, r in zip(plen, rlen, strict=True)],
                       prompt_lengths=plen, response_lengths=rlen, loss_masks=[[1] * r for r in rlen],
                       rollout_log_probs=[[-2.0] * r for r in rlen], advantages=[g.random() - 0.5 for _ in range(n)],
                       rewards=[0.0] * n, staleness=[0] * n)
    mean_len = sum(p + r for p, r in zip(plen, rlen, strict=True)) / n
    budget = int(8 * mean_len)
    # one rank (same weights and process group for both); the flags are switched between steps
    rank = FSDPTrainRank(default_args(hf_checkpoint=ckpt, rollout_batch_size=n // 8, n_samples_per_prompt=8,
                                      micro_batch_size=8, lr=1e-6), 0, 1)
    rank.init(*rank.master_address())
    padded = {}
    for name, kw in (("fixed", {}), ("dynamic", {"max_tokens": budget})):
        mbs = micro_batches(batch, 8, **kw)
        padded[name] = sum(len(mb.tokens) * max(len(t) for t in mb.tokens) for mb in mbs)
    real = sum(p + r for p, r in zip(plen, rlen, strict=True))
    times: dict[str, list[float]] = {"fixed": [], "dynamic": []}
    for _ in range(a.reps + 1):
        for name in ("fixed", "dynamic"):  # interleaved: the machine's noise hits both alike
            rank.args.use_dynamic_batch_size = name == "dynamic"
            rank.args.max_tokens_per_gpu = budget if name == "dynamic" else None
            t0 = time.perf_counter()
            rank.train_step(batch)
            times[name].append(time.perf_counter() - t0)
    times = {k: v[1:] for k, v in times.items()}  # the first round warms up
    rank.shutdown()
    fixed, dyn = statistics.median(times["fixed"]), statistics.median(times["dynamic"])
    print(json.dumps({"bench": "dynamic_batch", "samples": n, "real_tokens": real, "max_tokens_per_gpu": budget,
                      "padded_tokens_fixed": padded["fixed"], "padded_tokens_dynamic": padded["dynamic"],
                      "step_s_fixed": round(fixed, 3), "step_s_dynamic": round(dyn, 3),
                      "speedup": round(fixed / dyn, 2)}), flush=True)


if __name__ == "__main__":
    main()
