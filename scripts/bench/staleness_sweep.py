"""How much of sync's learning async keeps, per staleness bound and off-policy correction, on two tasks.

The job of scripts/bench/offpolicy.py (tiny Qwen3 after SFT warm-up, 16 prompts x 8 samples per step, the same
learning rate everywhere), at `--update-weights-interval 1 --max-staleness K` with a buffer of (K + 1) steps of
groups, so that the engine (faster than the trainer here) runs ahead to the bound; K = 0 is the async machinery at
zero lag. Every correction of CORRECTIONS at every K, every seed; `pipelines.synchronous` with the same optimizer
schedule (1 or --num-mini-batches optimizer steps per batch) is the reference. Tasks:

  * sort      the demo's task: sort four digits, exact-match reward (0/1), 300-step SFT warm-up;
  * reverse   reverse four digits, partial credit (fraction of positions right: a dense reward), 30-step warm-up.

Writes <out>/sweep.jsonl (one line per (task, K, correction) and per (task, sync schedule)), <out>/runs.jsonl (one
line per run with its eval curve), <out>/staleness_sweep.png (final eval reward against K, one line per
correction, one panel per task) and <out>/staleness_sweep_wallclock.png (eval reward against wall-clock time:
sync and the best async settings). Runs go `--parallel` at a time, one torch thread per engine and trainer;
`--deadline-s` stops starting runs after that many seconds (what finished is still reported). The defaults (3
corrections x 5 K x 2 tasks x 3 seeds + sync, 96 runs) take about 18 minutes on 16 cores.

    python scripts/bench/staleness_sweep.py [--steps 40] [--seeds 3] [--parallel 10] [--tasks sort reverse]
        [--ks 0 1 2 4 8] [--corrections tis decoupled ...] [--out runs/staleness_sweep]
        [--skip-done RUNS_JSONL ...] [--aggregate RUNS_JSONL ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

JOB = ("--rollout-batch-size 16 --n-samples-per-prompt 8 --rollout-max-response-len 8 --micro-batch-size 128 "
       "--rollout-num-engines 1 --actor-num-gpus-per-node 1 --n-samples-per-eval-prompt 4 --partial-rollout").split()
TASKS = {
    "sort": {"prepare": ["--task", "sort"], "dir": "outputs/demo", "flags": []},
    "reverse": {"prepare": ["--task", "reverse", "--sft-steps", "30"], "dir": "outputs/demo_reverse",
                "flags": ["--custom-rm-path", "streamrl.tasks.synthetic:partial_credit_rm"]},
}
# name -> flags. With no correction flag streamrl runs "rollout_logprobs" (DEFAULT, chosen from this sweep)
DEFAULT = "rollout_logprobs"
CORRECTIONS = {
    "tis": ["--use-tis", "--num-mini-batches", "1"],
    "rollout_logprobs": ["--use-rollout-logprobs", "--num-mini-batches", "1"],
    "icepop": ["--tis-mode", "mask", "--tis-clip-low", "0.5", "--tis-clip", "2", "--num-mini-batches", "1"],
    "m2": ["--use-tis", "--m2-threshold", "0.04", "--num-mini-batches", "1"],
    "decoupled": ["--use-tis", "--num-mini-batches", "4"],
    "decoupled_m2": ["--use-tis", "--num-mini-batches", "4", "--m2-threshold", "0.04"],
    "rollout_logprobs_mb4": ["--use-rollout-logprobs", "--num-mini-batches", "4"],
    "geometric": ["--use-tis", "--tis-level", "geometric", "--num-mini-batches", "1"],
    "decay": ["--use-tis", "--staleness-decay", "0.5", "--num-mini-batches", "1"],
    "rollout_logprobs_m2": ["--use-rollout-logprobs", "--m2-threshold", "0.04", "--num-mini-batches", "1"],
    "decoupled_mb2": ["--use-tis", "--num-mini-batches", "2"],
    "tis_tight": ["--use-tis", "--tis-clip", "1.2", "--num-mini-batches", "1"],
}
MAIN = ["tis", "rollout_logprobs", "rollout_logprobs_m2"]


def schedule(corr: str) -> str:
    """The sync reference of a correction: sync with the same optimizer steps per batch (--num-mini-batches)."""
    flags = CORRECTIONS[corr]
    return f"sync_mb{flags[flags.index('--num-mini-batches') + 1]}" if "--num-mini-batches" in flags else "sync_mb1"


def sync_flags(name: str) -> list[str]:
    return ["--num-mini-batches", name.removeprefix("sync_mb")]


def run_one(task: str, k: int | None, corr: str, seed: int, a: argparse.Namespace, out: Path) -> dict:
    """One training run (k None: pipelines.synchronous with `corr` a sync schedule name); its summary and curves."""
    t = TASKS[task]
    demo = ROOT / t["dir"]
    name = f"{task}_{corr}_k{'sync' if k is None else k}_s{seed}"
    run_dir = out / "runs" / name
    if k is None:
        module, extra = "pipelines.synchronous", ["--async-buffer-size", "16", *sync_flags(corr)]
    else:
        module = "pipelines.async_loop"
        extra = ["--update-weights-interval", "1", "--max-staleness", str(k), "--async-buffer-size",
                 str(16 * (k + 1)), *CORRECTIONS[corr]]
    argv = ["--hf-checkpoint", str(demo / "sft"), "--prompt-data", str(demo / "train.jsonl"), "--label-key", "label",
            "--eval-prompt-data", str(demo / "eval.jsonl"), "--eval-interval", str(a.eval_interval),
            "--num-rollout", str(a.steps), "--lr", str(a.lr), "--seed", str(seed), "--rollout-seed", str(seed),
            "--engine-torch-threads", "1", "--train-torch-threads", "1", "--run-dir", str(run_dir), *JOB,
            *t["flags"], *extra]
    code = (f"import sys; from streamrl.config import parse_args; from {module} import run; "
            "run(parse_args(sys.argv[1:]))")
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "RAY_DEDUP_LOGS": "0"}
    t0 = time.time()
    log = (out / "logs" / f"{name}.log").open("w")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    res = {"task": task, "k": k, "correction": corr, "seed": seed, "rc": proc.returncode,
           "wall_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        return res
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "reward" in r and "loss" in r]
    res.update(eval_initial=summary["eval_initial"], eval_final=summary["eval_final"],
               train_wall_s=summary["wall_time"],
               eval_curve=[(round(r["time"], 2), r["eval/reward"]) for r in rows if "eval/reward" in r],
               staleness_mean=statistics.mean(r["staleness_mean"] for r in steps),
               staleness_max=max(r["staleness_max"] for r in steps),
               reward_curve=[round(r["reward"], 3) for r in steps])
    for key in ("train_rollout_logprob_abs_diff", "tis", "tis_clipfrac", "tis_rejected_frac", "pg_clipfrac"):
        vals = [r[key] for r in steps if key in r]
        res[key] = statistics.mean(vals) if vals else None
    buckets: dict[str, list[float]] = {}
    for r in steps:
        for key, v in r.items():
            if key.startswith("mismatch/"):
                buckets.setdefault(key, []).append(v)
    res["mismatch"] = {key: round(statistics.mean(v), 4) for key, v in sorted(buckets.items())}
    return res


def _r(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def aggregate(results: list[dict]) -> list[dict]:
    seen, ok = set(), []
    for r in results:  # one run per (task, K, correction, seed): the first that finished
        key = (r["task"], r["k"], r["correction"], r["seed"])
        if r["rc"] == 0 and key not in seen:
            seen.add(key)
            ok.append(r)
    lines = []
    refs: dict[tuple[str, str], float] = {}
    for task in TASKS:
        init = [r["eval_initial"] for r in ok if r["task"] == task]
        initial = statistics.mean(init) if init else None
        for ref in sorted({r["correction"] for r in ok if r["task"] == task and r["k"] is None}):
            rs = [r for r in ok if r["task"] == task and r["k"] is None and r["correction"] == ref]
            finals = [r["eval_final"] for r in rs]
            refs[(task, ref)] = statistics.mean(finals)
            lines.append({"task": task, "k": "sync", "correction": ref, "seeds": len(rs),
                          "eval_initial": _r(initial), "eval_final_mean": _r(statistics.mean(finals)),
                          "eval_final_std": _r(statistics.pstdev(finals)), "eval_final_per_seed": finals,
                          "wall_s": _r(statistics.mean(r["train_wall_s"] for r in rs), 1)})
        keys = sorted({(r["k"], r["correction"]) for r in ok if r["task"] == task and r["k"] is not None})
        for k, corr in keys:
            rs = [r for r in ok if r["task"] == task and r["k"] == k and r["correction"] == corr]
            finals = [r["eval_final"] for r in rs]
            line = {"task": task, "k": k, "correction": corr + (" (default)" if corr == DEFAULT else ""),
                    "flags": " ".join(CORRECTIONS[corr]),
                    "seeds": len(rs), "eval_initial": _r(initial), "eval_final_mean": _r(statistics.mean(finals)),
                    "eval_final_std": _r(statistics.pstdev(finals)), "eval_final_per_seed": finals}
            for ref_name, key in ((schedule(corr), "recovered"), ("sync_mb1", "recovered_vs_sync_mb1")):
                ref = refs.get((task, ref_name))
                if ref is not None and initial is not None and ref - initial > 1e-9:
                    line[key] = round((statistics.mean(finals) - initial) / (ref - initial), 3)
            line.update(
                sync_reference=schedule(corr),
                wall_s=_r(statistics.mean(r["train_wall_s"] for r in rs), 1),
                staleness_mean=_r(statistics.mean(r["staleness_mean"] for r in rs), 3),
                staleness_max=max(r["staleness_max"] for r in rs),
                logprob_abs_diff=_r(statistics.mean(r["train_rollout_logprob_abs_diff"] for r in rs)),
                tis_ratio=_r(statistics.mean(r["tis"] for r in rs)),
                tis_clipfrac=_r(statistics.mean(r["tis_clipfrac"] for r in rs)),
                rejected_frac=_r(statistics.mean(r["tis_rejected_frac"] for r in rs)),
                pg_clipfrac=_r(statistics.mean(r["pg_clipfrac"] for r in rs)),
            )
            mm: dict[str, list[float]] = {}
            for r in rs:
                for key, v in r["mismatch"].items():
                    mm.setdefault(key, []).append(v)
            line["mismatch_by_staleness"] = {key: round(statistics.mean(v), 4) for key, v in mm.items()}
            lines.append(line)
    return lines


def plot(lines: list[dict], results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(x["task"] == t for x in lines)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [x for x in lines if x["task"] == task]
        for corr in CORRECTIONS:
            pts = sorted((x["k"], x["eval_final_mean"], x["eval_final_std"], x["seeds"]) for x in rows
                         if x["correction"].split()[0] == corr and x["k"] != "sync")
            if not pts:
                continue
            ks, ys, es, ns = zip(*pts, strict=True)
            name = corr + (" (default)" if corr == DEFAULT else "")
            if len(ks) == 1:  # measured at one K only: a marker, with its seed count
                ax.errorbar(ks, ys, yerr=es, fmt="x", capsize=2, alpha=0.6, label=f"{name} (K={ks[0]}, {ns[0]} seeds)")
            else:
                ax.errorbar(ks, ys, yerr=es, marker="o", capsize=3, lw=2.5 if corr == DEFAULT else 1.2, label=name)
        for x in rows:
            if x["k"] == "sync":
                ax.axhline(x["eval_final_mean"], ls="--", lw=1, color="k" if x["correction"] == "sync_mb1"
                           else "grey", label=f"{x['correction']} ({x['seeds']} seeds)")
        if rows:
            ax.axhline(rows[0]["eval_initial"], ls=":", lw=1, color="r", label="before RL")
        ax.set(title=f"{task}: final eval reward vs max staleness", xlabel="--max-staleness K (interval 1)",
               ylabel="eval reward (mean ± std over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "staleness_sweep.png", dpi=110)

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [x for x in lines if x["task"] == task and x["k"] != "sync"]
        best = {}
        for x in rows:  # the best correction at each K (measured with 3 seeds or more)
            if x["k"] > 0 and x["seeds"] >= 3 and (x["k"] not in best or x["eval_final_mean"]
                                                   > best[x["k"]]["eval_final_mean"]):
                best[x["k"]] = x
        shown = [("sync", "sync_mb1")] + [(b["k"], b["correction"].split()[0]) for b in best.values()]
        for k, corr in shown:
            rs = [r for r in results if r["rc"] == 0 and r["task"] == task and r["correction"] == corr
                  and (r["k"] is None if k == "sync" else r["k"] == k)]
            if not rs:
                continue
            n = statistics.mode(len(r["eval_curve"]) for r in rs)  # runs with the same --eval-interval
            rs = [r for r in rs if len(r["eval_curve"]) == n]
            ts = [statistics.mean(r["eval_curve"][i][0] for r in rs) for i in range(n)]
            ys = [statistics.mean(r["eval_curve"][i][1] for r in rs) for i in range(n)]
            ax.plot(ts, ys, marker="o", label="sync" if k == "sync" else f"async K={k} {corr}",
                    color="k" if k == "sync" else None)
        ax.set(title=f"{task}: eval reward vs wall-clock (mean over seeds)", xlabel="seconds since start",
               ylabel="eval reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "staleness_sweep_wallclock.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4, 8])
    p.add_argument("--corrections", nargs="+", default=MAIN, choices=list(CORRECTIONS),
                   help="default: the three that docs/offpolicy.md ran over the whole K grid")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) * 5 // 8),
                   help="runs at a time (each: one engine thread, one trainer thread, Ray)")
    p.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--out", default="runs/staleness_sweep")
    p.add_argument("--no-sync", action="store_true", help="skip the sync references")
    p.add_argument("--skip-done", nargs="+", default=[], metavar="RUNS_JSONL",
                   help="leave out the runs that finished in these runs.jsonl files of earlier sweeps")
    p.add_argument("--aggregate", nargs="+", default=None, metavar="RUNS_JSONL",
                   help="run nothing: aggregate and plot the runs.jsonl files of earlier sweeps into --out")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.aggregate:
        results = [json.loads(x) for f in a.aggregate for x in Path(f).open()]
        return report(results, out)
    (out / "logs").mkdir(exist_ok=True)
    t_start = time.time()
    prep = []
    for task in a.tasks:
        t = TASKS[task]
        if not (ROOT / t["dir"] / "sft" / "config.json").exists():
            prep.append(subprocess.Popen([sys.executable, "scripts/prepare_demo.py", "--out", str(ROOT / t["dir"]),
                                          *t["prepare"]], cwd=ROOT, stdout=subprocess.DEVNULL))
    for proc in prep:
        if proc.wait():
            raise SystemExit("prepare_demo.py failed")
    syncs = sorted({schedule(c) for c in a.corrections})
    jobs = []
    for seed in range(1, a.seeds + 1):  # seed-major: a deadline leaves every setting with the same seeds
        for task in a.tasks:
            if not a.no_sync:
                jobs += [(task, None, s, seed) for s in syncs]
            jobs += [(task, k, c, seed) for k in a.ks for c in a.corrections]
    done = {(r["task"], r["k"], r["correction"], r["seed"]) for f in a.skip_done for r in map(json.loads, open(f))
            if r["rc"] == 0}
    jobs = [j for j in jobs if j not in done]
    results: list[dict] = []

    def body(job):
        if a.deadline_s is not None and time.time() - t_start > a.deadline_s:
            return None
        r = run_one(*job, a, out)
        with (out / "runs.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[sweep] {time.time() - t_start:6.0f}s {r['task']} k={r['k']} {r['correction']} s{r['seed']}: "
              f"rc {r['rc']} eval {r.get('eval_initial')} -> {r.get('eval_final')} ({r['wall_s']}s)", flush=True)
        return r

    with ThreadPoolExecutor(a.parallel) as pool:
        results = [r for r in pool.map(body, jobs) if r is not None]
    print(f"[sweep] {len(results)}/{len(jobs)} runs ({sum(r['rc'] != 0 for r in results)} failed) in "
          f"{time.time() - t_start:.0f}s")
    report(results, out)


def report(results: list[dict], out: Path) -> None:
    lines = aggregate(results)
    with (out / "sweep.jsonl").open("w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    plot(lines, results, out)
    print(f"[sweep] {len(lines)} lines -> {out}/sweep.jsonl, {out}/staleness_sweep.png")


if __name__ == "__main__":
    main()
