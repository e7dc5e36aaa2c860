"""Async vs sync on one GPU: trainer (FSDP2, NCCL) and embedded engine as separate processes sharing the card.

Model: random-init Qwen3-0.6B shape with the in-repo tokenizer; data: the sort task. Two jobs, each chosen so that
generation and training take about the same time in the sync run:
  * `uniform`: 256 samples per step, every response 192 tokens (a random model never stops early);
  * `long_tail`: 256 samples per step, response lengths log-normal (median 96, a few up to 768 tokens, see
    long_tail.py), as RL rollouts of a real policy are; micro-batches packed by tokens (--use-dynamic-batch-size).
Runs the sync pipeline and the async pipeline at --update-weights-interval 1 and 2; prints one JSON line with wall
time per step, generation and training time, trainer idle fraction and the speedups.

    python3 -P scripts/bench/async_vs_sync_gpu.py [--job uniform] [--steps 10] [--flags="--use-mps --bf16"] [--tag x]
        [--variant 'keepkv=--engine-keep-kv-on-update' ...]

`--variant NAME=FLAGS` (repeatable) adds an async run at interval 2 with FLAGS on top of --flags, reported as
NAME_* next to the others (A/B of engine or trainer settings in the same run, against the same sync baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOB = ("--rollout-batch-size 32 --n-samples-per-prompt 8 --lr 1e-6 "
       "--micro-batch-size 32 --use-tis --rollout-num-engines 1 --actor-num-gpus-per-node 1 "
       "--sglang-server-concurrency 256 --rollout-temperature 1.0 "
       # arrivals join the running batch every 8 decode steps: one eager prefill for several groups (SGLang's flag)
       "--sglang-num-continuous-decode-steps 8").split()
JOBS = {
    "uniform": "--rollout-max-response-len 192 --engine-max-context-len 256".split(),
    "long_tail": ("--rollout-max-response-len 768 --engine-max-context-len 1024 --use-dynamic-batch-size "
                  "--max-tokens-per-gpu 6144 --custom-generate-function-path "
                  f"{ROOT}/scripts/bench/long_tail.py:generate").split(),
}
# async: how far (in versions) a group may lag; a long-tailed job needs room for the long samples
STALENESS = {"uniform": 1, "long_tail": 4}


def prepare(out: Path) -> Path:
    code = ("import sys; from streamrl.models.tiny import build_tiny_model; "
            "from streamrl.tasks.synthetic import write_task_jsonl; "
            "build_tiny_model(sys.argv[1] + '/model', preset='qwen3-0.6b', max_positions=1024); "
            "write_task_jsonl(sys.argv[1] + '/train.jsonl', 'sort', 4000, seed=2)")
    cfg = out / "model" / "config.json"  # rebuilt when an older run left a model with a shorter context
    if not cfg.exists() or json.loads(cfg.read_text())["max_position_embeddings"] < 1024:
        subprocess.run([sys.executable, "-P", "-c", code, str(out)], cwd=ROOT, check=True)
    return out


def run(mode: str, interval: int, steps: int, data: Path, out: Path, extra_flags: list[str], job: str,
        pause_mode: str = "in_place", label: str = "") -> dict:
    name = f"{job}_{label or mode + str(interval)}"
    common = ["--hf-checkpoint", str(data / "model"), "--prompt-data", str(data / "train.jsonl"), "--label-key",
              "label", "--num-rollout", str(steps), "--run-dir", str(out / name), *JOB, *JOBS[job], *extra_flags]
    if mode == "async":
        extra = ["--async-buffer-size", "64", "--max-staleness", str(STALENESS[job]), "--update-weights-interval",
                 str(interval), "--partial-rollout", "--pause-generation-mode", pause_mode]
        entry = "from pipelines.async_loop import run"
    else:
        extra = ["--async-buffer-size", "32"]
        entry = "from pipelines.synchronous import run"
    # preflight as train_async.py runs it: a model whose context cannot hold the job's responses fails here, not as
    # hundreds of engine 400s (failed groups) inside the measurement
    code = (f"import sys; from streamrl.config import parse_args; from streamrl.config.preflight import preflight; "
            f"{entry}; a = parse_args(sys.argv[1:]); preflight(a); run(a)")
    subprocess.run([sys.executable, "-P", "-c", code, *common, *extra], cwd=ROOT, check=True)
    summary = json.loads((out / name / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").open()]
    # measured window: from the end of step 2 to the end of the last step (steps 1-2 pay CUDA-graph capture, the
    # allocator's growth and the trainer's first kernels); per-step means are over the steps inside it
    rows = [r for r in rows if "train_time" in r][1:]
    inside = rows[1:]
    summary["train_s_per_step"] = statistics.mean(r["train_time"] for r in inside)
    summary["sync_s_per_step"] = statistics.mean(r.get("sync_total_time", 0.0) for r in inside)
    summary["s_per_step"] = (rows[-1]["time"] - rows[0]["time"]) / max(len(rows) - 1, 1)
    # the trainer's idle fraction over the same steps (the whole run's figure includes the first step's start-up)
    summary["trainer_idle"] = (rows[-1]["trainer_wait_time"] - rows[0]["trainer_wait_time"]) / (
        rows[-1]["time"] - rows[0]["time"])
    summary["response_len"] = statistics.mean(r["response_len"] for r in inside)
    synced = [r for r in inside if "sync_total_time" in r]  # where a weight sync's time goes, mean over the syncs
    keys = sorted({k for r in synced for k in r if k.startswith("sync_") and k.endswith("_time")})
    summary["sync_breakdown"] = {k: statistics.mean(r.get(k, 0.0) for r in synced) for k in keys} if synced else {}
    summary["train_breakdown"] = {k: statistics.mean(r.get(k, 0.0) for r in inside) for k in (
        "train_batch_time", "train_prepare_time", "train_fwd_bwd_time", "train_optimizer_time")}
    first, last = rows[0], rows[-1]
    if "engine_busy_time" in first and "engine_busy_time" in last:  # the engine over the same steps (one engine)
        d = {k: last[k] - first.get(k, 0.0) for k in last if k.startswith("engine_") and k != "engine_count"}
        summary["engine_idle"] = 1 - d["engine_busy_time"] / (last["time"] - first["time"])
        its = max(d.get("engine_iterations", 0.0), 1.0)
        summary["engine_iterations"] = {  # mean rows per iteration and ms per iteration by phase
            "per_s": d.get("engine_iterations", 0.0) / (last["time"] - first["time"]),
            "mean_rows": d.get("engine_rows", 0.0) / its, "prefill_rows": d.get("engine_prefill_rows", 0.0) / its,
            **{k.removeprefix("engine_time_") + "_ms": 1000 * v / its for k, v in d.items()
               if k.startswith("engine_time_")}}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="uniform")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pause-mode", default="in_place", choices=["abort", "in_place"],
                   help="--pause-generation-mode of the async runs")
    p.add_argument("--runs", nargs="*", default=["sync", "async", "async2"], choices=["sync", "async", "async2"])
    p.add_argument("--out", default="runs/bench_gpu")
    p.add_argument("--flags", default="", help="extra flags for every run, e.g. '--use-mps --bf16'")
    p.add_argument("--tag", default="", help="a name for this configuration in the JSON line")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra async run (interval 2) with FLAGS added to --flags; repeatable")
    a = p.parse_args()
    out = ROOT / a.out
    data = prepare(out / "data")
    extra = a.flags.split()
    runs = {"sync": ("sync", 1, []), "async": ("async", 1, []), "async2": ("async", 2, [])}
    plan = [(k, *runs[k]) for k in a.runs]
    for spec in a.variant:
        name, _, flags = spec.partition("=")
        if not name.isidentifier() or name in runs or name in [x[0] for x in plan]:
            p.error(f"--variant {spec!r}: need a new NAME=FLAGS (NAME a word)")
        plan.append((name, "async", 2, flags.split()))
    res: dict[str, dict] = {}
    for key, mode, interval, flags in plan:
        res[key] = run(mode, interval, a.steps, data, out, extra + flags, a.job, a.pause_mode,
                       label="" if key in runs else key)
        line = result_line(a, res)  # after every run, so that a run cut short still leaves the earlier ones
        (out / "partial.json").write_text(json.dumps(line))
    print(json.dumps(line), flush=True)
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def result_line(a: argparse.Namespace, res: dict[str, dict]) -> dict:
    import torch

    line = {"bench": "async_vs_sync_gpu", "job": a.job, "tag": a.tag, "flags": a.flags, "pause_mode": a.pause_mode,
            "device": torch.cuda.get_device_name(), "steps": a.steps,
            "samples_per_step": next(iter(res.values()))["samples_per_step"]}
    for k, r in res.items():
        line[f"{k}_s_per_step"] = round(r["s_per_step"], 3)
        line[f"{k}_train_s_per_step"] = round(r["train_s_per_step"], 3)
        line[f"{k}_sync_s_per_step"] = round(r["sync_s_per_step"], 3)
        line[f"{k}_trainer_idle"] = round(r["trainer_idle"], 3)
        line[f"{k}_engine_idle"] = round(r["engine_idle"], 3) if "engine_idle" in r else None
        line[f"{k}_response_len"] = round(r["response_len"], 1)
        line[f"{k}_staleness_hist"] = r["buffer"].get("staleness_hist")
        line[f"{k}_regenerated_groups"] = r["manager"].get("regenerated_groups")
        line[f"{k}_ledger"] = r["ledger"]
        line[f"{k}_sync_breakdown"] = {x: round(v, 3) for x, v in r["sync_breakdown"].items()}
        line[f"{k}_train_breakdown"] = {x: round(v, 3) for x, v in r["train_breakdown"].items()}
        line[f"{k}_engine_iterations"] = {x: round(v, 2) for x, v in r.get("engine_iterations", {}).items()}
    if "sync" in res:
        line["sync_generation_s_per_step"] = round(res["sync"]["s_per_step"] * res["sync"]["trainer_idle"], 3)
        for k, name in (("async", "speedup_interval1"), ("async2", "speedup_interval2")):
            if k in res:
                line[name] = round(res["sync"]["s_per_step"] / res[k]["s_per_step"], 3)
        for spec in a.variant:
            k = spec.partition("=")[0]
            if k in res:
                line[f"{k}_flags"] = spec.partition("=")[2]
                line[f"speedup_{k}"] = round(res["sync"]["s_per_step"] / res[k]["s_per_step"], 3)
    return line


if __name__ == "__main__":
    main()
