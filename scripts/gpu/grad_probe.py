"""Where a train step's gradient stops being finite: per decoder layer, the forward output's RMS and the backward
gradient's norm, and the parameters whose gradient is not finite, for several trainer flag sets on the batch of
scripts/bench/train_step.py (production rank, world size 1). One JSON line per flag set.

    python3 -P scripts/gpu/grad_probe.py [--samples 64] [--sets "bf16_tis=--bf16 --use-tis;fp32_tis=--use-tis"]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts" / "bench")]

BASE = "--use-dynamic-batch-size --lr 1e-6 --n-samples-per-prompt 8 --actor-num-gpus-per-node 1".split()
DEFAULT_SETS = ("bf16_tis=--bf16 --use-tis --max-tokens-per-gpu 6144;"
                "fp32_tis=--use-tis --max-tokens-per-gpu 6144;"
                "bf16_notis=--bf16 --no-use-tis --max-tokens-per-gpu 6144;"
                "bf16_tis_eager=--bf16 --use-tis --max-tokens-per-gpu 6144 --attn-implementation eager")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def probe(model: str, samples: int, flags: list[str]) -> dict:
    from train_step import make_batch

    from streamrl.config import parse_args
    from streamrl.train.fsdp import FSDPTrainRank

    args = parse_args(["--hf-checkpoint", model, "--rollout-max-response-len", "768", "--rollout-batch-size",
                       str(samples // 8), "--async-buffer-size", str(samples // 8), "--micro-batch-size",
                       str(min(32, samples)), *BASE, *flags])
    rank = FSDPTrainRank(args, 0, 1)
    rank.init(*rank.master_address(), shares_gpu=False)
    layers = rank.model.model.layers
    fwd: dict[int, list[float]] = {}
    bwd: dict[int, list[float]] = {}

    def hook(i):
        def f(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            fwd.setdefault(i, []).append(_local(h).float().pow(2).mean().sqrt().item())
            if h.requires_grad:
                h.register_hook(lambda g: bwd.setdefault(i, []).append(_local(g).float().norm().item()))
        return f

    for i, layer in enumerate(layers):
        layer.register_forward_hook(hook(i))
    bad: list[str] = []
    per_param: dict[str, float] = {}
    clip = rank._clip_grad_norm

    def clip_and_record():
        for name, p in rank.model.named_parameters():
            if p.grad is not None:
                n = _local(p.grad).float().norm().item()
                per_param[name] = n
                if not math.isfinite(n):
                    bad.append(name)
        return clip()

    rank._clip_grad_norm = clip_and_record
    batch = make_batch(samples, 768, json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    out = rank.train_step(batch)
    top = sorted(((v, k) for k, v in per_param.items() if math.isfinite(v)), reverse=True)[:5]
    rank.shutdown()
    return {"loss": out["loss"], "grad_norm": out["grad_norm"], "tis": out.get("tis"),
            "n_bad_params": len(bad), "bad_params_first": bad[:8],
            "largest_finite_param_grads": [[k, f"{v:.3e}"] for v, k in top],
            "layer_fwd_rms_max": {i: f"{max(v):.3e}" for i, v in sorted(fwd.items())},
            "layer_bwd_grad_norm_max": {i: f"{max(v):.3e}" for i, v in sorted(bwd.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--preset", default="qwen3-0.6b", choices=["qwen3-0.6b", "tiny"])
    p.add_argument("--sets", default=DEFAULT_SETS)
    p.add_argument("--out", default=None)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(probe(a.model, a.samples, a.one.split())), flush=True)
        return
    from train_step import model_dir

    model = model_dir(a.preset)
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for item in a.sets.split(";"):
        name, flags = item.split("=", 1)
        proc = subprocess.run([sys.executable, "-P", __file__, "--one", flags, "--model", model, "--samples",
                               str(a.samples)], cwd=ROOT, capture_output=True, text=True)
        row = {"probe": name, "flags": flags, "samples": a.samples}
        if proc.returncode:
            row["error"] = proc.stderr[-1500:]
        else:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(row), flush=True)
        if out:
            with (out / "grad_probe.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
