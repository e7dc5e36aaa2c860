"""The asynchronous training loop (the default pipeline of `train_async.py`).

    producers (RolloutManager actor)                 driver (this loop)                 engines
    ───────────────────────────────                  ──────────────────                 ───────
    admit while in_flight < limit and                get(B groups)  <── waits only if
      slots < (v+K+1)·N·B  ────────┐                   the buffer is empty
    /generate ... reward           │                 build batch (advantages by estimator)
    put(group) ──> Buffer ─────────┼───────────────> train_step on every FSDP rank
      (blocks when full)           │                 every N steps: pause ───────────────> abort in-flight (kept)
                                   │                   push weights (v+1) ───────────────> load, confirm v+1
    resubmit aborted prefixes <────┘                   set_version(v+1), continue ───────> generate again
                                                     log, eval (in the background), plots

Who waits for whom: producers wait on admission (staleness bound) and on a full buffer (backpressure); the
trainer waits only when no group is ready; engines pause only for the weight push.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import ray

from buffers.admission import groups_per_step
from pipelines.checkpoint import latest_meta, load_checkpoint, save_checkpoint, saved_weight_diff
from pipelines.debug_train import save_debug_rollout
from pipelines.evals import BackgroundEval
from pipelines.health import engine_counters, get_batch, pipeline_health, token_balance, weight_diff
from pipelines.launch import Components, build, shutdown
from streamrl.config.parser import steps_total
from streamrl.metrics import MetricsLogger, plot_run
from streamrl.plugins import load_function
from streamrl.sync.colocate import make_publisher
from streamrl.train.batch import TrainBatch, build_train_batch, eos_id


def run(args: argparse.Namespace, sync_mode: bool = False) -> dict[str, Any]:
    """Run the job; returns a summary (final eval reward, ledger, timings). `sync_mode` is pipelines/synchronous.py."""
    total = steps_total(args)
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    resume = latest_meta(args.load, args.ckpt_step) if args.load else None
    logger = MetricsLogger(args, run_dir, total, resume_offset=resume and resume["metrics_offset"])
    c = build(args)
    try:
        job = _Job(args, c, logger, run_dir, total)
        for step in range(job.begin(), total):
            groups = job.get_groups(step)  # waits only when the buffer has no batch ready
            batch, metrics = job.train(groups, step)
            if (step + 1) % args.update_weights_interval == 0:
                job.publish()
            job.log(step + 1, groups, batch, metrics)
            if args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < total:
                save_checkpoint(c, args.save, step + 1, job.version, logger.position(), args)
        return job.finish(sync_mode)
    finally:
        logger.close()
        shutdown(c)


class _Job:
    """The loop's state between steps: weight version, timings, the pending per-step queries, the eval."""

    def __init__(self, args: argparse.Namespace, c: Components, logger: MetricsLogger, run_dir: Path, total: int):
        self.args, self.c, self.logger, self.total = args, c, logger, total
        self.b = groups_per_step(args)
        self.eos = eos_id(args.hf_checkpoint)
        # --custom-reward-post-process-path, loaded once (a bad spec fails before any work)
        self.post_process = (load_function(args.custom_reward_post_process_path,
                                           what="--custom-reward-post-process-path")
                             if args.custom_reward_post_process_path else None)
        self.publisher = make_publisher(c, args)  # with --colocate it also moves the memory (sync/colocate.py)
        self.eval = BackgroundEval(args, c.manager, logger)
        self.version, self.wait_total, self.trained_samples, self.last_sync = 0, 0.0, 0, {}
        self.refs: tuple = ()
        self.summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": total,
                                        "samples_per_step": args.global_batch_size}

    def begin(self) -> int:
        """Resume (trainer, buffer + ledger, producers; then the engines get the trainer's weights as the saved
        version) or evaluate the initial weights; start the producers. Returns the first step."""
        args, c, start = self.args, self.c, 0
        if args.load:
            resume = load_checkpoint(c, args.load, args)
            start, self.version = resume["step"], resume["version"]
            self.last_sync = self.publisher.publish(self.version)
            self.summary["resumed_from"] = resume
            if args.check_weight_update_equal:
                self.summary["resume_weight_check"] = {"trainer_vs_checkpoint": saved_weight_diff(c, resume["dir"]),
                                                       "engines_vs_trainer": weight_diff(c)}
            print(f"[streamrl] resumed from {resume['dir']}: step {start}, version {self.version}", flush=True)
            for flag, (was, now) in resume["changed_flags"].items():
                print(f"[streamrl] --{flag.replace('_', '-')} changed from {was} to {now}: admission pacing restarts "
                      "from the checkpoint's position", flush=True)
        elif not args.skip_eval_before_train and (r := self.eval.run_now(0, "before")) is not None:
            self.summary["eval_initial"] = r
        ray.get(c.manager.start.remote())
        self.t_start = time.time()
        return start

    def get_groups(self, step: int) -> list:
        t0 = time.time()
        groups = get_batch(self.c, self.b, step, self.args.rollout_watchdog_timeout)
        self.wait_total += time.time() - t0
        if self.args.save_debug_rollout_data:  # for --load-debug-rollout-data (pipelines/debug_train.py)
            save_debug_rollout(self.args.save_debug_rollout_data, step, self.version, groups)
        return groups

    def train(self, groups: list, step: int) -> tuple[TrainBatch, dict[str, float]]:
        """One train step; the buffer's and producers' figures and the ledger check are asked for first, so that
        they are answered while the trainer works. No trainer with --debug-rollout-only."""
        c = self.c
        batch = build_train_batch(self.args, groups, self.version, self.eos, self.post_process)
        # the producers' figures are not awaited: skipped this step if they are busy
        self.refs = (c.buffer.stats.remote(), c.manager.get_stats.remote(), c.buffer.check_ledger.remote(full=False))
        metrics: dict[str, float] = {}
        if c.trainer is not None:
            self.publisher.before_train()  # --colocate: the engines give the GPU to the trainer
            metrics = c.trainer.train_step(batch)
        self.trained_samples += len(batch)
        return batch, metrics

    def publish(self) -> None:
        if self.c.trainer is not None:
            self.last_sync = self.publisher.publish(self.version + 1)
            self.version += 1

    def log(self, step: int, groups: list, batch: TrainBatch, metrics: dict[str, float]) -> None:
        stats_ref, prod_ref, check_ref = self.refs
        elapsed = time.time() - self.t_start
        bstats = ray.get(stats_ref)
        ray.get(check_ref)  # the group ledger adds up (raises if not)
        record = {
            "step": step, "reward": sum(batch.rewards) / len(batch), "version": self.version,
            "samples_per_s": self.trained_samples / elapsed, "buffer_fill": bstats["size"],
            "buffer_capacity": bstats["capacity"], "staleness_mean": sum(batch.staleness) / len(batch),
            "staleness_max": max(batch.staleness), "trainer_wait_frac": self.wait_total / elapsed,
            "trainer_wait_time": self.wait_total, "response_len": sum(batch.response_lengths) / len(batch),
            "mixed_version_samples": sum(len(set(s.token_versions)) > 1 for g in groups for s in g),
            **pipeline_health(bstats, prod_ref), **metrics, **self.last_sync, **engine_counters(self.c.engine_urls),
        }
        self.last_sync = {}
        self.eval.poll(record)
        self.eval.maybe_start(step, self.total)
        self.logger.log({k: v for k, v in record.items() if k != "eval/reward"})
        if step % self.args.log_interval == 0 or step == self.total:
            print(self.logger.status_line(record), flush=True)

    def finish(self, sync_mode: bool) -> dict[str, Any]:
        """Final weights to the engines, producers stopped (cut groups kept as partials), final checkpoint and
        eval, the ledgers checked, summary.json and the plot."""
        args, c, summary, total = self.args, self.c, self.summary, self.total
        summary["wall_time"] = time.time() - self.t_start
        summary["trainer_wait_frac"] = self.wait_total / summary["wall_time"]
        if total % args.update_weights_interval:  # the engines serve the final weights for the final eval
            self.publish()
        if args.check_weight_update_equal:
            summary["weight_check_max_diff"] = weight_diff(c)
        self.publisher.wait()
        summary["manager"] = ray.get(c.manager.stop.remote())
        self.eval.wait()
        if args.save_interval:  # the final one also keeps the groups cut off by the stop (as partials)
            summary["checkpoint"] = str(save_checkpoint(c, args.save, total, self.version, self.logger.position(),
                                                        args))
        if (r := self.eval.run_now(total, "after")) is not None:
            summary["eval_final"] = r
        summary["ledger"] = ray.get(c.buffer.check_ledger.remote())
        summary["tokens"] = tok = token_balance(c)
        if not tok["balanced"]:
            print(f"[streamrl] WARNING: the token ledger does not balance: {tok}", flush=True)
        summary.update(buffer=ray.get(c.buffer.stats.remote()), version=self.version, sync_mode=sync_mode)
        if args.save:
            c.trainer.save_hf(args.save)
        if args.save_hf and not args.save_interval:  # with it, every checkpoint (the final one too) exported
            c.trainer.save_hf(args.save_hf.format(rollout_id=total))
        summary["plot"] = str(plot_run(Path(summary["run_dir"])))
        self.logger.log({"summary": summary})
        (Path(summary["run_dir"]) / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[streamrl] done: ledger {summary['ledger']}; tokens generated {tok['generated']} = trained "
              f"{tok['trained']} + discarded {tok['discarded']} + carried {tok['carried']} "
              f"({'balanced' if tok['balanced'] else 'NOT balanced'}); plot {summary['plot']}", flush=True)
        return summary
