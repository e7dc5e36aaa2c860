"""Async vs sync on one GPU: trainer (FSDP2, NCCL) and embedded engine as separate processes sharing the card.

Model: random-init Qwen3-0.6B shape with the in-repo tokenizer; data: the sort task. The job (256 samples per step,
192-token responses) is chosen so that generation and training take about the same time in the sync run. Runs the
sync pipeline and the async pipeline at --update-weights-interval 1 and 2; prints one JSON line with wall time per
step, generation and training time, trainer idle fraction and the speedups.

    python3 -P scripts/bench/async_vs_sync_gpu.py [--steps 10] [--flags="--use-mps --bf16"] [--tag name]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOB = ("--rollout-batch-size 32 --n-samples-per-prompt 8 --rollout-max-response-len 192 --lr 1e-6 "
       "--micro-batch-size 32 --use-tis --rollout-num-engines 1 --actor-num-gpus-per-node 1 "
       "--sglang-server-concurrency 256 --engine-max-context-len 256 --rollout-temperature 1.0").split()


def prepare(out: Path) -> Path:
    code = ("import sys; from streamrl.models.tiny import build_tiny_model; "
            "from streamrl.tasks.synthetic import write_task_jsonl; "
            "build_tiny_model(sys.argv[1] + '/model', preset='qwen3-0.6b'); "
            "write_task_jsonl(sys.argv[1] + '/train.jsonl', 'sort', 4000, seed=2)")
    if not (out / "model" / "config.json").exists():
        subprocess.run([sys.executable, "-P", "-c", code, str(out)], cwd=ROOT, check=True)
    return out


def run(mode: str, interval: int, steps: int, data: Path, out: Path, extra_flags: list[str]) -> dict:
    name = f"{mode}{interval}"
    common = ["--hf-checkpoint", str(data / "model"), "--prompt-data", str(data / "train.jsonl"), "--label-key",
              "label", "--num-rollout", str(steps), "--run-dir", str(out / name), *JOB, *extra_flags]
    if mode == "async":
        extra = ["--async-buffer-size", "64", "--max-staleness", "1", "--update-weights-interval", str(interval),
                 "--partial-rollout"]
        entry = "from pipelines.async_loop import run"
    else:
        extra = ["--async-buffer-size", "32"]
        entry = "from pipelines.sync import run"
    code = f"import sys; from streamrl.config import parse_args; {entry}; run(parse_args(sys.argv[1:]))"
    subprocess.run([sys.executable, "-P", "-c", code, *common, *extra], cwd=ROOT, check=True)
    summary = json.loads((out / name / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").open()]
    rows = [r for r in rows if "train_time" in r][1:]  # the first step pays CUDA-graph capture and warm-up
    summary["train_s_per_step"] = statistics.mean(r["train_time"] for r in rows)
    summary["sync_s_per_step"] = statistics.mean(r.get("sync_total_time", 0.0) for r in rows)
    summary["s_per_step"] = (rows[-1]["time"] - rows[0]["time"]) / max(len(rows) - 1, 1)
    busy = [r.get("engine_busy_time") for r in rows]
    if busy[0] is not None and busy[-1] is not None:  # engine idle over the same steps (one engine)
        summary["engine_idle"] = 1 - (busy[-1] - busy[0]) / (rows[-1]["time"] - rows[0]["time"])
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="runs/bench_gpu")
    p.add_argument("--flags", default="", help="extra flags for every run, e.g. '--use-mps --bf16'")
    p.add_argument("--tag", default="", help="a name for this configuration in the JSON line")
    a = p.parse_args()
    out = ROOT / a.out
    data = prepare(out / "data")
    extra = a.flags.split()
    res = {"sync": run("sync", 1, a.steps, data, out, extra), "async": run("async", 1, a.steps, data, out, extra),
           "async2": run("async", 2, a.steps, data, out, extra)}
    import torch

    line = {"bench": "async_vs_sync_gpu", "tag": a.tag, "flags": a.flags, "device": torch.cuda.get_device_name(),
            "steps": a.steps, "samples_per_step": res["sync"]["samples_per_step"]}
    for k, r in res.items():
        line[f"{k}_s_per_step"] = round(r["s_per_step"], 3)
        line[f"{k}_train_s_per_step"] = round(r["train_s_per_step"], 3)
        line[f"{k}_sync_s_per_step"] = round(r["sync_s_per_step"], 3)
        line[f"{k}_trainer_idle"] = round(r["trainer_wait_frac"], 3)
        line[f"{k}_engine_idle"] = round(r["engine_idle"], 3) if "engine_idle" in r else None
    line["sync_generation_s_per_step"] = round(res["sync"]["s_per_step"] * res["sync"]["trainer_wait_frac"], 3)
    line["speedup_interval1"] = round(res["sync"]["s_per_step"] / res["async"]["s_per_step"], 3)
    line["speedup_interval2"] = round(res["sync"]["s_per_step"] / res["async2"]["s_per_step"], 3)
    print(json.dumps(line), flush=True)
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
