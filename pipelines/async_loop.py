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
from buffers.tokens import balance
from pipelines.checkpoint import latest_meta, load_checkpoint, save_checkpoint, saved_weight_diff
from pipelines.debug_train import save_debug_rollout
from pipelines.launch import build, shutdown
from streamrl.config.parser import steps_total
from streamrl.data import load_prompts
from streamrl.metrics import MetricsLogger, plot_run
from streamrl.plugins import load_function
from streamrl.sync.base import http_client
from streamrl.sync.publisher import WeightPublisher
from streamrl.train.batch import build_train_batch, eos_id
from streamrl.wire import decode_batch


def run(args: argparse.Namespace, sync_mode: bool = False) -> dict[str, Any]:
    """Run the job; returns a summary (final eval reward, ledger, timings). `sync_mode` is pipelines/synchronous.py."""


    records, _ = load_prompts(args.prompt_data, args.input_key, args.label_key, args.metadata_key)
    total = steps_total(args, len(records))
    if args.lr_decay_iters is None:  # the learning-rate schedule decays over the whole job (Megatron's default)
        args.lr_decay_iters = total
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")

    resume = latest_meta(args.load, args.ckpt_step) if args.load else None
    logger = MetricsLogger(args, run_dir, total, resume_offset=resume and resume["metrics_offset"])
    c = build(args)
    eos = eos_id(args.hf_checkpoint)
    post_process = None  # --custom-reward-post-process-path, loaded once (a bad spec fails before any work)
    if args.custom_reward_post_process_path:

        post_process = load_function(args.custom_reward_post_process_path,
                                     what="--custom-reward-post-process-path")
    b, n_int = groups_per_step(args), args.update_weights_interval
    version, wait_total, trained_samples, last_sync = 0, 0.0, 0, {}
    eval_ref, eval_started_at = None, 0
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": total, "samples_per_step": args.global_batch_size}

    def start_eval(step: int):
        if not args.eval_prompt_data:
            return None, step
        return c.manager.evaluate.remote(step), step  # eval/<name>/reward, eval/reward, eval/version

    publisher = WeightPublisher(c, args.pause_generation_mode)

    try:
        start_step = 0
        if args.load:  # trainer, buffer + ledger, producers; then the engines get the trainer's weights as v
            resume = load_checkpoint(c, args.load, args)
            start_step, version = resume["step"], resume["version"]
            last_sync = publisher.publish(version)
            summary["resumed_from"] = resume
            if args.check_weight_update_equal:
                summary["resume_weight_check"] = {"trainer_vs_checkpoint": saved_weight_diff(c, resume["dir"]),
                                                  "engines_vs_trainer": _weight_diff(c)}
            print(f"[streamrl] resumed from {resume['dir']}: step {start_step}, version {version}", flush=True)
            for flag, (was, now) in resume["changed_flags"].items():
                print(f"[streamrl] --{flag.replace('_', '-')} changed from {was} to {now}: admission pacing restarts "
                      "from the checkpoint's position", flush=True)
        if args.eval_prompt_data and not args.skip_eval_before_train and not args.load:
            first = ray.get(c.manager.evaluate.remote(0))
            logger.log({"step": 0, **first})
            summary["eval_initial"] = first["eval/reward"]
            print(f"[streamrl] eval before training: reward {first['eval/reward']:.3f}", flush=True)
        ray.get(c.manager.start.remote())
        t_start = time.time()
        for step in range(start_step, total):
            t0 = time.time()
            groups = _get_batch(c, b, step, args.rollout_watchdog_timeout)
            wait_total += time.time() - t0
            if args.save_debug_rollout_data:  # for --load-debug-rollout-data (pipelines/debug_train.py)
                save_debug_rollout(args.save_debug_rollout_data, step, version, groups)
            batch = build_train_batch(args, groups, version, eos, post_process)
            stats_ref = c.buffer.stats.remote()  # answered while the trainer works
            prod_ref = c.manager.get_stats.remote()  # not awaited: skipped this step if the producers are busy
            check_ref = c.buffer.check_ledger.remote(full=False)  # the group ledger adds up (raises if not)
            m = c.trainer.train_step(batch) if c.trainer is not None else {}  # none with --debug-rollout-only
            trained_samples += len(batch)
            if (step + 1) % n_int == 0 and c.trainer is not None:
                last_sync = publisher.publish(version + 1)
                version += 1
            elapsed = time.time() - t_start
            bstats = ray.get(stats_ref)
            ray.get(check_ref)
            record = {
                "step": step + 1, "reward": sum(batch.rewards) / len(batch), "version": version,
                "samples_per_s": trained_samples / elapsed, "buffer_fill": bstats["size"],
                "buffer_capacity": bstats["capacity"], "staleness_mean": sum(batch.staleness) / len(batch),
                "staleness_max": max(batch.staleness), "trainer_wait_frac": wait_total / elapsed,
                "trainer_wait_time": wait_total,
                "response_len": sum(batch.response_lengths) / len(batch),
                "mixed_version_samples": sum(len(set(s.token_versions)) > 1 for g in groups for s in g),
                **_pipeline_health(bstats, prod_ref), **m, **last_sync,
            }
            record.update(_engine_counters(c.engine_urls))
            last_sync = {}
            if eval_ref is not None and ray.wait([eval_ref], timeout=0)[0]:
                result = ray.get(eval_ref)  # logged at the step whose weights it measured
                logger.log({"step": eval_started_at, **result})
                record["eval/reward"] = result["eval/reward"]
                eval_ref = None
            if args.eval_interval and eval_ref is None and (step + 1) % args.eval_interval == 0 and step + 1 < total:
                eval_ref, eval_started_at = start_eval(step + 1)
            logger.log({k: v for k, v in record.items() if k != "eval/reward"})
            if (step + 1) % args.log_interval == 0 or step + 1 == total:
                print(logger.status_line(record), flush=True)
            if args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < total:
                save_checkpoint(c, args.save, step + 1, version, logger.position(), args)
        summary["wall_time"] = time.time() - t_start
        summary["trainer_wait_frac"] = wait_total / summary["wall_time"]
        if total % n_int and c.trainer is not None:  # the engines serve the final weights for the final eval
            publisher.publish(version + 1)
            version += 1
        if args.check_weight_update_equal:
            summary["weight_check_max_diff"] = _weight_diff(c)
        publisher.wait()
        summary["manager"] = ray.get(c.manager.stop.remote())
        if eval_ref is not None:
            ray.get(eval_ref)
        if args.save_interval:  # the final one also keeps the groups cut off by the stop (as partials)
            summary["checkpoint"] = str(save_checkpoint(c, args.save, total, version, logger.position(), args))
        if args.eval_prompt_data:
            final = ray.get(c.manager.evaluate.remote(total))
            logger.log({"step": total, **final})
            summary["eval_final"] = final["eval/reward"]
            print(f"[streamrl] eval after training: reward {final['eval/reward']:.3f}", flush=True)
        summary["ledger"] = ray.get(c.buffer.check_ledger.remote())
        summary["tokens"] = token_balance(c)
        if not summary["tokens"]["balanced"]:
            print(f"[streamrl] WARNING: the token ledger does not balance: {summary['tokens']}", flush=True)
        summary["buffer"] = ray.get(c.buffer.stats.remote())
        summary["version"] = version
        summary["sync_mode"] = sync_mode
        if args.save:
            c.trainer.save_hf(args.save)
        summary["plot"] = str(plot_run(run_dir))
        logger.log({"summary": summary})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        tok = summary["tokens"]
        print(f"[streamrl] done: ledger {summary['ledger']}; tokens generated {tok['generated']} = trained "
              f"{tok['trained']} + discarded {tok['discarded']} + carried {tok['carried']} "
              f"({'balanced' if tok['balanced'] else 'NOT balanced'}); plot {summary['plot']}", flush=True)
        return summary
    finally:
        logger.close()
        shutdown(c)


def _pipeline_health(bstats: dict[str, Any], prod_ref: Any) -> dict[str, Any]:
    """Per-step pacing and token figures: look-ahead (outstanding groups) against the pacing bound, admission
    room left, tokens wasted (settled as discarded) and, when the producers answered in time, generated."""

    slots = bstats["slots"]
    out = {"lookahead": slots["outstanding"], "pacing_used": slots["used"], "pacing_limit": slots["limit"],
           "pacing_room": slots["room"], "tokens_trained": bstats["tokens_trained"],
           "tokens_wasted": bstats["tokens_wasted"]}
    if ray.wait([prod_ref], timeout=0)[0]:
        st = ray.get(prod_ref)
        out.update(tokens_generated=st["tokens_generated"], groups_in_flight=st["in_flight"])
    return out


def token_balance(c: Any) -> dict[str, Any]:
    """The token ledger at the end of a run (producers stopped): generated = trained + discarded + carried."""


    settled = ray.get(c.buffer.token_ledger.remote())
    prod = ray.get(c.manager.token_state.remote())
    carried = {**settled.pop("carried"), "in_flight": prod["in_flight"], "partial_stopped": prod["partial_stopped"]}
    return balance(prod["generated"], settled, carried)


def _get_batch(c: Any, b: int, step: int, watchdog_s: float | None, poll_s: float = 5.0) -> list:
    """buffer.get, checking every `poll_s` that the producers are alive, can still deliver, and make progress:
    with no group settled and no token generated for `watchdog_s` while the trainer waits, the job stops and
    says what is stuck."""


    while True:
        try:  # msgpack bytes from the buffer, decoded here (the trainer's side pays the decode, nobody else)
            return decode_batch(ray.get(c.buffer.get_encoded.remote(b, step, timeout=poll_s)))
        except TimeoutError:
            try:
                st = ray.get(c.manager.get_stats.remote(), timeout=60)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError("the rollout producers did not answer for 60 s: their event loop is blocked "
                                   "(a synchronous plug-in that never returns?)") from None
            if st["fatal"]:
                raise RuntimeError(f"rollout producers crashed:\n{st['fatal']}") from None
            if st["exhausted"] and st["in_flight"] == 0 and ray.get(c.buffer.size.remote()) < b:
                raise RuntimeError(f"prompt data exhausted before step {step + 1} (--num-epoch too small?)") from None
            if watchdog_s and st["last_progress_age_s"] > watchdog_s:
                raise RuntimeError(stuck_message(st, ray.get(c.buffer.stats.remote()), step, watchdog_s)) from None


def stuck_message(st: dict[str, Any], bstats: dict[str, Any], step: int, watchdog_s: float) -> str:
    """One line naming what holds a job that made no rollout progress for `watchdog_s` seconds."""
    old, slots = st["oldest_in_flight"], bstats["slots"]
    where = (f"{st['in_flight']} groups in flight, the oldest ({old['group']}) {old['stage']} for "
             f"{old['age_s']:.0f} s" if old else "no group in flight")
    if not old and slots["room"] == 0:
        where += (f"; admission pacing allows no new group ({slots['used']} slots used of {slots['limit']}, "
                  f"{bstats['size']} queued)")
    errors = f"; last errors: {st['errors'][-2:]}" if st["errors"] else ""
    return (f"no rollout progress for {st['last_progress_age_s']:.0f} s (--rollout-watchdog-timeout {watchdog_s:g}) "
            f"while the trainer waits for step {step + 1}: {where}{errors}")


def _engine_counters(urls: list[str]) -> dict[str, float]:
    """Cumulative counters of the embedded engines, summed: `engine_busy_time` (seconds in forward steps; engine
    idle = 1 - d(busy) / d(wall) / engine_count) and `engine_<k>` for the iteration stats (rows, iterations, time
    per phase).
    Empty for engines that do not report them (SGLang)."""

    total: dict[str, float] = {}
    for u in urls:
        try:
            state = http_client().get(u + "/server_info", timeout=5).json()["internal_states"][0]
            counters = {"busy_time": state["busy_time"], **state.get("step_stats", {})}
        except Exception:  # not the embedded engine, or it is busy answering: no figure this step
            return {}
        for k, v in counters.items():
            total[f"engine_{k}"] = total.get(f"engine_{k}", 0.0) + float(v)
    if total:
        total["engine_count"] = len(urls)
    return total


def _weight_diff(c: Any) -> float:
    """Largest |engine - trainer| over every parameter of every engine (0.0 means the sync is exact)."""

    trainer = dict(c.trainer.full_named_parameters())
    worst = 0.0
    for sd in ray.get([e.get_state_dict.remote() for e in c.engines]):
        missing = set(trainer) - set(sd)
        if missing:
            raise RuntimeError(f"engine lacks trainer parameters {sorted(missing)[:3]}")
        worst = max([worst, *((trainer[k] - sd[k]).abs().max().item() for k in trainer)])
    return worst
