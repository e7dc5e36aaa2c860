"""The FSDP trainer's step, today's path and each speed option side by side in one run (issue: a fast trainer).

Model: random-init Qwen3-0.6B shape (`--preset qwen3-0.6b`, streamrl/models/tiny.py) saved once under --out;
batch: --samples samples of 40 prompt tokens and long-tailed response lengths (long_tail.py: log-normal, median 96,
capped at --max-response), GRPO with TIS as in async_vs_sync_gpu.py's long_tail job. Each variant is a set of
trainer flags run through the production rank (`FSDPTrainRank.init` + `train_step`, world size 1) in its own
process (compile caches, Liger's patches and peak memory stay apart): --warmup steps, then --steps timed ones.

One JSON line per variant: s/step, tokens/s, MFU (6 N tokens / s over the card's bf16 matmul peak, measured here
with a large bf16 matmul), peak memory, and the first step's loss and grad norm (the same weights and batch in every
variant, so they must agree within bf16 rounding); then a summary line with each variant's speed-up and its loss
and grad-norm differences from the first variant. Results also go to --out/train_step.jsonl.

    python3 -P scripts/bench/train_step.py [--variants padded,packed_varlen,...] [--steps 3] [--out DIR]
    python3 -P scripts/bench/train_step.py --preset tiny --samples 16       # CPU smoke run

Another backend joins as a variant whose flags include `--train-backend NAME` once `RANKS` knows its rank class.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts" / "bench")]

COMMON = ("--bf16 --use-dynamic-batch-size --use-tis --lr 1e-6 --n-samples-per-prompt 8 "
          "--actor-num-gpus-per-node 1").split()
PACKED = "--qkv-format thd --max-tokens-per-gpu 16384".split()
VARIANTS = {  # name -> trainer flags on top of COMMON; the first is the baseline of the ratios
    "padded": "--max-tokens-per-gpu 6144".split(),  # today's path (async_vs_sync_gpu.py's long_tail job)
    "packed_sdpa": PACKED,
    "packed_flex": [*PACKED, "--attn-implementation", "flex_attention"],
    "packed_varlen": [*PACKED, "--attn-implementation", "varlen"],
    "packed_varlen_liger": [*PACKED, "--attn-implementation", "varlen", "--use-liger-kernel"],
    "packed_varlen_compile": [*PACKED, "--attn-implementation", "varlen", "--use-torch-compile"],
    "packed_varlen_compile_liger": [*PACKED, "--attn-implementation", "varlen", "--use-torch-compile",
                                    "--use-liger-kernel"],
    "packed_varlen_compile_32k": [*PACKED, "--attn-implementation", "varlen", "--use-torch-compile",
                                  "--max-tokens-per-gpu", "32768"],
    "packed_varlen_compile_recompute": [*PACKED, "--attn-implementation", "varlen", "--use-torch-compile",
                                        "--recompute-granularity", "full", "--max-tokens-per-gpu", "49152"],
    # Megatron-core GPTModel (local spec, SDPA attention), same padded micro-batches as "padded"
    "megatron_padded": "--train-backend megatron --max-tokens-per-gpu 6144".split(),
    # Megatron with packed streams (thd PackedSeqParams; varlen FlashAttention inside its core attention on GPU)
    "megatron_packed": ["--train-backend", "megatron", *PACKED],
    "megatron_packed_compile": ["--train-backend", "megatron", *PACKED, "--use-torch-compile"],
}
CPU_VARIANTS = ["padded", "packed_sdpa", "packed_varlen"]  # flex has no CPU backward; compile and Liger are GPU's


def rank_class(backend: str):
    """The rank that runs `train_step` for --train-backend; a new backend adds its class here."""
    from streamrl.train.fsdp import FSDPTrainRank

    ranks = {"fsdp": FSDPTrainRank}
    if backend == "megatron":  # megatron-core is optional
        from streamrl.train.megatron.rank import MegatronTrainRank

        ranks["megatron"] = MegatronTrainRank
    if backend not in ranks:
        raise SystemExit(f"--train-backend {backend}: scripts/bench/train_step.py has no rank class for it yet")
    return ranks[backend]


def make_batch(n: int, max_response: int, vocab_size: int, seed: int = 0):
    from long_tail import target_length

    from streamrl.train.batch import TrainBatch

    rng = random.Random(seed)
    resp = [target_length(i, max_response) for i in range(n)]
    # ordinary tokens only (the cost does not depend on the ids; the special ids 0-5 include the pad token, whose
    # embedding row is zero in HF's model and not in Megatron's)
    tokens = [[rng.randrange(6, 50) for _ in range(40 + r)] for r in resp]
    mu = -math.log(vocab_size)  # behaviour log-probs near a random-init model's own: TIS weights near 1
    return TrainBatch(tokens=tokens, prompt_lengths=[40] * n, response_lengths=resp,
                      loss_masks=[[1] * r for r in resp], rollout_log_probs=[[mu] * r for r in resp],
                      advantages=[rng.gauss(0, 1) for _ in resp], rewards=[0.0] * n, staleness=[0] * n)


def matmul_peak_tflops() -> float:
    """The best of several large matmuls (bf16 on CUDA, fp32 on CPU), in TFLOP/s."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    best = float("inf")
    for _ in range(10):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best / 1e12


def run_variant(a: argparse.Namespace) -> dict:
    """One variant in this process: build the rank, warm up, time; the first step's loss and grad norm."""
    import torch

    from streamrl.config import parse_args

    flags = [*COMMON, *VARIANTS[a.variant]]
    if not torch.cuda.is_available():
        flags.remove("--bf16")  # CPU: fp32 (the default path there)
    args = parse_args(["--hf-checkpoint", a.model, "--rollout-max-response-len", str(a.max_response),
                       "--rollout-batch-size", str(a.samples // 8), "--async-buffer-size", str(a.samples // 8),
                       "--micro-batch-size", str(min(32, a.samples)), *flags])
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rank = rank_class(args.train_backend)(args, 0, 1)
    rank.init(*rank.master_address(), shares_gpu=False)
    batch = make_batch(a.samples, a.max_response, json.loads((Path(a.model) / "config.json").read_text())["vocab_size"])
    first = rank.train_step(batch)  # the weights of the checkpoint: every variant starts here
    for _ in range(a.warmup - 1):
        rank.train_step(batch)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        rank.train_step(batch)
    sync()
    s = (time.perf_counter() - t0) / a.steps
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    tokens = sum(len(t) for t in batch.tokens)
    params = sum(p.numel() for p in rank.model.parameters())
    rank.shutdown()
    return {"variant": a.variant, "flags": " ".join(VARIANTS[a.variant]), "s_per_step": round(s, 4),
            "tokens_per_s": round(tokens / s), "tokens": tokens, "params": params,
            "tflops_6nd": round(6 * params * tokens / s / 1e12, 2), "peak_mem_gb": round(peak / 2**30, 2),
            "loss": first["loss"], "grad_norm": first["grad_norm"]}


def model_dir(preset: str) -> str:
    """The random-init checkpoint, built once per machine (kept out of --out: 2.4 GB for the 0.6B shape)."""
    from streamrl.models.tiny import build_tiny_model

    path = ROOT / "runs" / "bench_train_step" / f"model-{preset}"
    if not (path / "config.json").exists():
        build_tiny_model(path, preset=preset, max_positions=1024)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b", choices=["qwen3-0.6b", "tiny"])
    p.add_argument("--samples", type=int, default=256, help="samples per step (a multiple of 8)")
    p.add_argument("--max-response", type=int, default=768)
    p.add_argument("--variants", default=None, help="comma-separated names (default: all that the device runs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first gives loss and grad norm)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--out", default="runs/bench_train_step")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:  # a child: one variant, one JSON line
        print(json.dumps(run_variant(a)), flush=True)
        return
    import torch

    out = Path(a.out) if Path(a.out).is_absolute() else ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    names = a.variants.split(",") if a.variants else list(VARIANTS) if cuda else CPU_VARIANTS
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    model = model_dir(a.preset)
    peak = matmul_peak_tflops()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    with (out / "train_step.jsonl").open("a") as log:
        for name in names:
            cmd = [sys.executable, "-P", __file__, "--variant", name, "--model", model, "--samples", str(a.samples),
                   "--max-response", str(a.max_response), "--warmup", str(a.warmup), "--steps", str(a.steps)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:  # one variant failing must not cost the others' measurements
                row = {"variant": name, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"],
                       "stderr_tail": proc.stderr[-1500:]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["mfu"] = round(row["tflops_6nd"] / peak, 4)
            row.update(bench="train_step", device=device, preset=a.preset, samples=a.samples)
            rows.append(row)
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
        ok = [r for r in rows if "error" not in r]
        base = ok[0] if ok else None
        summary = {"bench": "train_step_summary", "device": device, "matmul_peak_tflops": round(peak, 1),
                   "baseline": base["variant"] if base else None, "failed": [r["variant"] for r in rows
                                                                             if "error" in r]}
        for r in ok[1:]:
            summary[r["variant"]] = {
                "speedup": round(base["s_per_step"] / r["s_per_step"], 2), "mfu": r["mfu"],
                "loss_rel_diff": round(abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12), 5),
                "grad_norm_rel_diff": round(abs(r["grad_norm"] - base["grad_norm"]) / max(base["grad_norm"], 1e-12), 5),
                "peak_mem_ratio": round(r["peak_mem_gb"] / max(base["peak_mem_gb"], 1e-9), 2)}
        print(json.dumps(summary), flush=True)
        log.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
