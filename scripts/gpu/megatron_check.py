"""One RL step from the same weights and batch under `--train-backend fsdp` and `--train-backend megatron`: loss and
grad norm of each as one JSON line, with their relative differences (issue: the Megatron backend).

Model: random-init Qwen3-0.6B shape (streamrl/models/tiny.py preset "qwen3-0.6b", built once under runs/);
batch: scripts/bench/train_step.py's (40-token prompts, long-tailed responses), GRPO with TIS, padded micro-batches
by token budget. Each backend runs in its own process (world size 1), through the production rank class.
Expected agreement: bf16 (the default on GPU) within bf16 rounding, about 1e-2 relative (FSDP2 keeps bf16
parameters in the forward, Megatron here fp32 parameters under bf16 autocast); --fp32 within 1e-4.

    python3 -P scripts/gpu/megatron_check.py [--fp32] [--samples 64] [--preset tiny]   # --preset tiny: CPU smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts" / "bench")]


def one_backend(a: argparse.Namespace) -> dict:
    import torch
    from train_step import make_batch, rank_class

    from streamrl.config import parse_args

    cuda = torch.cuda.is_available()
    flags = ["--hf-checkpoint", a.model, "--train-backend", a.backend, "--use-dynamic-batch-size",
             "--max-tokens-per-gpu", "6144", "--use-tis", "--lr", "1e-6", "--n-samples-per-prompt", "8",
             "--rollout-batch-size", str(a.samples // 8), "--async-buffer-size", str(a.samples // 8),
             "--micro-batch-size", str(min(32, a.samples)), "--rollout-max-response-len", str(a.max_response),
             "--actor-num-gpus-per-node", "1", *(["--bf16"] if cuda and not a.fp32 else [])]
    rank = rank_class(a.backend)(parse_args(flags), 0, 1)
    rank.init(*rank.master_address(), shares_gpu=False)
    t0 = time.perf_counter()
    vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    out = rank.train_step(make_batch(a.samples, a.max_response, vocab))
    if cuda:
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    rank.shutdown()
    return {"loss": out["loss"], "grad_norm": out["grad_norm"], "pg_clipfrac": out["pg_clipfrac"],
            "first_step_s": round(s, 3), "bf16": "--bf16" in flags}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b", choices=["qwen3-0.6b", "tiny"])
    p.add_argument("--samples", type=int, default=64, help="samples in the step (a multiple of 8)")
    p.add_argument("--max-response", type=int, default=768)
    p.add_argument("--fp32", action="store_true", help="fp32 on GPU too (tight agreement)")
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.backend:  # a child: one backend, one JSON line
        print(json.dumps(one_backend(a)), flush=True)
        return
    import torch
    from train_step import model_dir

    model = model_dir(a.preset)
    row: dict = {"check": "megatron_vs_fsdp", "preset": a.preset, "samples": a.samples,
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for backend in ("fsdp", "megatron"):
        cmd = [sys.executable, "-P", __file__, "--backend", backend, "--model", model, "--samples", str(a.samples),
               "--max-response", str(a.max_response), *(["--fp32"] if a.fp32 else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        row[backend] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                        else {"error": proc.stderr.strip().splitlines()[-1:], "stderr_tail": proc.stderr[-1500:]})
    f, m = row["fsdp"], row["megatron"]
    if "loss" in f and "loss" in m:
        row["loss_rel_diff"] = abs(m["loss"] - f["loss"]) / max(abs(f["loss"]), 1e-12)
        row["grad_norm_rel_diff"] = abs(m["grad_norm"] - f["grad_norm"]) / max(f["grad_norm"], 1e-12)
        tol = 2e-2 if f["bf16"] else 1e-4
        row["ok"] = row["loss_rel_diff"] < tol and row["grad_norm_rel_diff"] < tol
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
