"""Off-policy correction under deliberately high staleness: final eval reward with TIS, without, and synchronous.

The demo job (the SFT checkpoint of scripts/prepare_demo.py, 16 prompts x 8 samples per step), several ways:

  * sync              `pipelines.synchronous`: generate, then train, then publish (staleness 0), the default correction
                      (a no-op up to numerics);
  * tis               async with `--update-weights-interval 4 --max-staleness 4 --async-buffer-size 64` (the
                      engines keep sampling with weights up to 4 versions = 16 steps old), `--use-tis` (the
                      default until issue 15);
  * no_tis            the same async job with `--disable-tis --allow-uncorrected-offpolicy`;
  * rollout_logprobs  the same async job with `--use-rollout-logprobs` (PPO's ratio and clip anchored at the
                      behaviour policy µ instead of TIS), which is what no correction flag now gives;
  * icepop            (only with --modes) TIS in mask mode: tokens with π_old/µ outside [0.5, 2] leave the loss.

Same checkpoint, data, steps and learning rate for every run. Prints one JSON line: final eval rewards (mean over
`--seeds`), the fraction of the sync improvement each async run recovers, and the staleness and mismatch the async
runs actually saw (mean staleness, mean TIS ratio and clip fraction, |ℓtrainer − ℓroll|).

    python scripts/bench/offpolicy.py [--steps 60] [--seeds 2] [--lr 1e-3] [--modes sync tis no_tis ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[2]

JOB = ("--rollout-batch-size 16 --n-samples-per-prompt 8 --rollout-max-response-len 8 --micro-batch-size 128 "
       "--rollout-num-engines 1 --actor-num-gpus-per-node 1 --n-samples-per-eval-prompt 4").split()
STALE = "--update-weights-interval 4 --max-staleness 4 --async-buffer-size 64 --partial-rollout".split()
MODES = {
    "sync": ("pipelines.synchronous", ["--async-buffer-size", "16"]),
    "tis": ("pipelines.async_loop", [*STALE, "--use-tis"]),
    "no_tis": ("pipelines.async_loop", [*STALE, "--disable-tis", "--allow-uncorrected-offpolicy"]),
    "rollout_logprobs": ("pipelines.async_loop", [*STALE, "--use-rollout-logprobs"]),
    "icepop": ("pipelines.async_loop", [*STALE, "--tis-mode", "mask", "--tis-clip-low", "0.5", "--tis-clip", "2"]),
}


def run(mode: str, seed: int, a: argparse.Namespace, demo: Path, out: Path) -> dict:
    module, extra = MODES[mode]
    threads = str(a.cores) if mode == "sync" else "1"  # sync: each phase gets every core in turn
    run_dir = out / f"{mode}_s{seed}"
    argv = ["--hf-checkpoint", str(demo / "sft"), "--prompt-data", str(demo / "train.jsonl"), "--label-key",
            "label", "--eval-prompt-data", str(demo / "eval.jsonl"), "--num-rollout", str(a.steps), "--lr",
            str(a.lr), "--seed", str(seed), "--rollout-seed", str(seed), "--engine-torch-threads", threads,
            "--train-torch-threads", threads, "--run-dir", str(run_dir), *JOB, *extra]
    code = (f"import sys; from streamrl.config import parse_args; from {module} import run; "
            "run(parse_args(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, check=True,
                   stdout=None if a.verbose else subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "reward" in r and "loss" in r]
    summary["step_means"] = {k: mean(r[k] for r in steps) for k in
                             ("staleness_mean", "tis", "tis_clipfrac", "train_rollout_logprob_abs_diff")
                             if all(k in r for r in steps)}
    summary["staleness_max"] = max(r["staleness_max"] for r in steps)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, default=2, help="repeat each mode with seeds 1..N and average")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--demo", default="outputs/demo", help="prepared by scripts/prepare_demo.py")
    p.add_argument("--out", default="runs/bench_offpolicy")
    p.add_argument("--modes", nargs="+", default=["sync", "tis", "no_tis", "rollout_logprobs"], choices=list(MODES))
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    demo, out = ROOT / a.demo, ROOT / a.out
    if not (demo / "sft" / "config.json").exists():
        subprocess.run([sys.executable, "scripts/prepare_demo.py", "--out", str(demo)], cwd=ROOT, check=True)
    res = {m: [run(m, s, a, demo, out) for s in range(1, a.seeds + 1)] for m in a.modes}
    final = {m: mean(r["eval_final"] for r in rs) for m, rs in res.items()}
    initial = mean(r["eval_initial"] for rs in res.values() for r in rs)
    gain = final["sync"] - initial if "sync" in final else None

    def stat(m: str, k: str) -> float | None:
        vals = [r["step_means"].get(k) for r in res[m]]
        return round(mean(vals), 4) if all(v is not None for v in vals) else None

    line: dict = {
        "bench": "offpolicy", "steps": a.steps, "seeds": a.seeds, "lr": a.lr, "samples_per_step": 128,
        "async": "update_weights_interval=4 max_staleness=4 async_buffer_size=64",
        "eval_reward_initial": round(initial, 4),
    }
    for m in res:
        name = m if m == "sync" else f"async_{m}"
        line[f"eval_reward_{name}"] = round(final[m], 4)
    line["per_seed"] = {m: [round(r["eval_final"], 4) for r in rs] for m, rs in res.items()}
    for m in res:
        if m != "sync" and gain:
            line[f"recovered_{m}"] = round((final[m] - initial) / gain, 3)  # share of the sync improvement
    for m in res:
        line[f"staleness_mean_{m}"] = stat(m, "staleness_mean")
        line[f"logprob_abs_diff_{m}"] = stat(m, "train_rollout_logprob_abs_diff")
    line["staleness_max"] = max(r["staleness_max"] for rs in res.values() for r in rs)
    if "tis" in res:
        line["tis_ratio_mean"], line["tis_clipfrac"] = stat("tis", "tis"), stat("tis", "tis_clipfrac")
    line["wall_s"] = {m: round(mean(r["wall_time"] for r in rs), 1) for m, rs in res.items()}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
