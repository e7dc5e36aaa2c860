"""What a person sees: one status line per step (fixed field order), metrics.jsonl, wandb (offline by default).

Status line fields, in order: step, reward, samples/s, buffer fill, staleness mean/max, trainer wait %, weight
version, ETA, and with the embedded engines their busy % and mean rows per iteration since the previous line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from streamrl.wandb_run import init_wandb


class MetricsLogger:
    def __init__(self, args: argparse.Namespace, run_dir: Path, total_steps: int, resume_offset: int | None = None):
        """`resume_offset`: continue metrics.jsonl from this byte offset (a checkpoint's `position()`), dropping
        rows logged after it; None starts a fresh file."""
        self.args, self.run_dir, self.total = args, run_dir, total_steps
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_offset is not None and path.exists():
            with path.open("r+b") as f:
                f.truncate(min(resume_offset, f.seek(0, 2)))
            self.file = path.open("a")
        else:
            self.file = path.open("w")
        # the run's flags beside its metrics: the plot's title and eval steps, and what a reader needs to redo it
        (run_dir / "config.json").write_text(json.dumps(vars(args), indent=1, sort_keys=True, default=str))
        self.t0 = time.time()
        self._prev: dict[str, Any] | None = None  # the record of the previous status line (engine deltas)
        self.wandb = None
        if args.use_wandb:

            self.wandb = init_wandb(args, run_dir, resuming=resume_offset is not None)

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time() - self.t0, 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.wandb is not None and "step" in numbers:  # x-axis: `step` (wandb_run.py), in any order
            self.wandb.log(numbers)

    def position(self) -> int:
        """Byte offset of the next row in metrics.jsonl (saved by checkpoints)."""
        return self.file.tell()

    def status_line(self, m: dict[str, Any]) -> str:
        step = m["step"]
        elapsed = time.time() - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        ev = f" | eval {m['eval/reward']:.3f}" if "eval/reward" in m else ""
        return (f"step {step:>4}/{self.total} | reward {m['reward']:.3f} | {m['samples_per_s']:6.1f} samples/s | "
                f"buffer {m['buffer_fill']:>3}/{m['buffer_capacity']} | stale {m['staleness_mean']:.2f}/"
                f"{m['staleness_max']} | wait {100 * m['trainer_wait_frac']:4.1f}% | v{m['version']} | "
                f"eta {eta:4.0f}s{ev}{self._engine_field(m)}")

    def _engine_field(self, m: dict[str, Any]) -> str:
        """" | engine 97% busy, 240 rows/it" over the interval since the previous status line (embedded engines)."""
        prev, self._prev = self._prev, {"time": time.time() - self.t0, **m}  # a logged row has its own time
        keys = ("engine_busy_time", "engine_iterations", "engine_rows")
        if prev is None or not all(k in m and k in prev for k in keys):
            return ""
        dt = self._prev["time"] - prev["time"]
        its = m["engine_iterations"] - prev["engine_iterations"]
        if dt <= 0 or its <= 0 or m.get("engine_count") != prev.get("engine_count") \
                or m["engine_busy_time"] < prev["engine_busy_time"]:
            return ""  # no interval, or the engine set changed (the sums cover other engines): no figure
        busy = (m["engine_busy_time"] - prev["engine_busy_time"]) / dt / m.get("engine_count", 1)
        return f" | engine {100 * busy:3.0f}% busy, {(m['engine_rows'] - prev['engine_rows']) / its:.0f} rows/it"

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def eval_steps(evals: list[dict[str, Any]], interval: int) -> list[float]:
    """The step each eval is plotted at: that of the weights it ran on (version v was published after step
    v * --update-weights-interval), not the step the driver logged it at."""
    return [r["eval/version"] * interval if "eval/version" in r else r["step"] for r in evals]


def plot_run(run_dir: Path) -> Path:
    """PNG of reward (train and eval) and staleness over steps, from metrics.jsonl."""
    import matplotlib  # only when plotting: picking the Agg backend is a process-wide side effect

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    train = [r for r in rows if "reward" in r and "step" in r]
    evals = [r for r in rows if "eval/reward" in r]
    eval_x = eval_steps(evals, cfg.get("update_weights_interval") or 1)
    # per-step idle fractions from the cumulative counters (trainer wait; embedded engines' busy time)
    util = [(b, a) for a, b in zip(train, train[1:], strict=False)
            if all(k in a and k in b for k in ("trainer_wait_time", "engine_busy_time")) and b["time"] > a["time"]]
    # off-policy mismatch per staleness bucket (KL(µ‖π_prox), streamrl/algos/corrections.py)
    buckets = sorted({int(k.split("/")[1][1:]) for r in train for k in r if k.startswith("mismatch/")
                      and k.endswith("/kl")})
    n = 2 + bool(util) + bool(buckets)
    fig, axes = plt.subplots(n, 1, figsize=(8, {2: 6, 3: 8.5}.get(n, 11)), sharex=True)
    ax1, ax2 = axes[0], axes[1]
    ax1.plot([r["step"] for r in train], [r["reward"] for r in train], label="train reward", alpha=0.6)
    if evals:
        ax1.plot(eval_x, [r["eval/reward"] for r in evals], "o-", label="eval reward (held out)")
    ax1.set_ylabel("reward")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    ax2.plot([r["step"] for r in train], [r["staleness_mean"] for r in train], label="mean staleness")
    ax2.plot([r["step"] for r in train], [r["staleness_max"] for r in train], label="max staleness")
    ax2.set_xlabel("train step")
    ax2.set_ylabel("versions behind")
    ax2.legend(loc="upper right")
    ax2.grid(alpha=0.3)
    if util:
        ax3 = axes[2]
        steps = [b["step"] for b, _ in util]
        ax3.plot(steps, [(b["trainer_wait_time"] - a["trainer_wait_time"]) / (b["time"] - a["time"])
                         for b, a in util], label="trainer idle")
        ax3.plot(steps, [1 - (b["engine_busy_time"] - a["engine_busy_time"]) / (b["time"] - a["time"])
                         / b.get("engine_count", 1) for b, a in util], label="engine idle (mean over engines)")
        ax3.set_ylabel("fraction of the step")
        ax3.set_ylim(-0.02, 1.02)
        ax3.legend(loc="upper right")
        ax3.grid(alpha=0.3)
        ax3.set_xlabel("train step")
    if buckets:
        ax4 = axes[-1]
        for k in buckets:
            pts = [(r["step"], r[f"mismatch/s{k}/kl"]) for r in train if f"mismatch/s{k}/kl" in r]
            ax4.plot(*zip(*pts, strict=True), ".-", ms=3, label=f"staleness {k}")
        ax4.set_ylabel("KL(µ‖π_prox) per token")
        ax4.set_yscale("symlog", linthresh=1e-3)
        ax4.legend(loc="upper left", fontsize=7, ncol=2)
        ax4.grid(alpha=0.3)
        ax4.set_xlabel("train step")
    task = cfg.get("prompt_data") or cfg.get("data_source_path") or "?"
    task = "/".join(Path(task).parts[-2:])  # e.g. demo/train.jsonl: the task's directory says which task
    fig.suptitle(f"{task} ({cfg.get('advantage_estimator', '?')}, max staleness "
                 f"{cfg.get('max_staleness', '?')}) | run {run_dir}", fontsize=9)
    fig.tight_layout()
    out = run_dir / "reward_staleness.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
