"""Async pipeline vs the synchronous baseline on the same job, side by side, on this machine.

Same model (the demo's SFT checkpoint), data, steps and samples. The sync run (`pipelines/synchronous.py`: generate,
then train, then sync) may use every core in each phase; the async run splits the cores between engine and trainer.
Prints one JSON line with both wall times, trainer idle fractions, final eval rewards and the speedup.

    python scripts/bench/async_vs_sync.py [--steps 30] [--cores 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

JOB = ("--rollout-batch-size 16 --n-samples-per-prompt 8 --rollout-max-response-len 8 --lr 1e-3 "
       "--micro-batch-size 128 --use-tis --rollout-num-engines 1 --actor-num-gpus-per-node 1").split()


def run(mode: str, out: Path, steps: int, cores: int, demo: Path, interval: int = 1) -> dict:
    common = ["--hf-checkpoint", str(demo / "sft"), "--prompt-data", str(demo / "train.jsonl"), "--label-key",
              "label", "--eval-prompt-data", str(demo / "eval.jsonl"), "--num-rollout", str(steps),
              "--run-dir", str(out / f"{mode}{interval}"), *JOB]
    if mode == "async":  # one core each: engine and trainer overlap
        extra = ["--engine-torch-threads", "1", "--train-torch-threads", "1", "--async-buffer-size", "32",
                 "--max-staleness", "1", "--update-weights-interval", str(interval), "--partial-rollout"]
        entry = "from pipelines.async_loop import run"
    else:  # every core in each phase: engine and trainer take turns
        extra = ["--engine-torch-threads", str(cores), "--train-torch-threads", str(cores),
                 "--async-buffer-size", "16"]
        entry = "from pipelines.synchronous import run"
    code = (f"import sys; from streamrl.config import parse_args; {entry}; "
            f"run(parse_args(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *common, *extra], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL if not VERBOSE else None)
    return json.loads((out / f"{mode}{interval}" / "summary.json").read_text())


VERBOSE = False


def main() -> None:
    global VERBOSE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--demo", default="outputs/demo", help="prepared by scripts/prepare_demo.py")
    p.add_argument("--out", default="runs/bench_async_vs_sync")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    VERBOSE = a.verbose
    demo, out = ROOT / a.demo, ROOT / a.out
    if not (demo / "sft" / "config.json").exists():
        subprocess.run([sys.executable, "scripts/prepare_demo.py", "--out", str(demo)], cwd=ROOT, check=True)
    res = {"sync": run("sync", out, a.steps, a.cores, demo), "async": run("async", out, a.steps, a.cores, demo),
           "async2": run("async", out, a.steps, a.cores, demo, interval=2)}
    print(json.dumps({
        "bench": "async_vs_sync", "steps": a.steps, "cores": a.cores,
        "samples_per_step": res["async"]["samples_per_step"],
        "wall_s_sync": round(res["sync"]["wall_time"], 2), "wall_s_async": round(res["async"]["wall_time"], 2),
        "wall_s_async_interval2": round(res["async2"]["wall_time"], 2),
        "trainer_idle_sync": round(res["sync"]["trainer_wait_frac"], 3),
        "trainer_idle_async": round(res["async"]["trainer_wait_frac"], 3),
        "eval_reward_initial": res["sync"].get("eval_initial"), "eval_reward_sync": res["sync"].get("eval_final"),
        "eval_reward_async": res["async"].get("eval_final"),
        "eval_reward_async_interval2": res["async2"].get("eval_final"),
        "speedup": round(res["sync"]["wall_time"] / res["async"]["wall_time"], 3),
        "speedup_interval2": round(res["sync"]["wall_time"] / res["async2"]["wall_time"], 3),
    }))


if __name__ == "__main__":
    main()
