"""End to end: one of two embedded engines is killed (SIGKILL) or frozen (SIGSTOP) mid-run. The job finishes on the
live engine with nothing failed or lost, counts the failure, and (--use-fault-tolerance) a replacement engine joins
at a weight sync holding exactly the trainer's weights."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from faultutil import signal_after_step

from streamrl.config import default_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_job_goes_on_when_an_engine_dies(ray_cluster, tiny_ckpt, sort_data, tmp_path, monkeypatch, fault):
    import pipelines.async_loop as async_loop
    import pipelines.launch as launch
    from pipelines.async_loop import run

    ray = ray_cluster
    real_build, box = launch.build, {}

    def build(args):
        c = real_build(args)
        box["pid"] = ray.get(c.engines[1].pid.remote())
        before = c.pool.before_sync

        def before_sync():  # the replacement joins at the first sync after it was started, whatever its load time
            c.pool.wait_replacements()
            before()

        c.pool.before_sync = before_sync
        return c

    monkeypatch.setattr(async_loop, "build", build)  # the loop's own reference (imported at its top)
    train, _ = sort_data
    steps = 6
    args = default_args(
        hf_checkpoint=tiny_ckpt, prompt_data=train, label_key="label",
        custom_rm_path=str(Path(__file__).parent / "plugins" / "rewards.py") + ":digit_fraction",
        rollout_num_engines=2, actor_num_gpus_per_node=1, rollout_batch_size=4, n_samples_per_prompt=4,
        micro_batch_size=4, num_rollout=steps, rollout_max_response_len=64, lr=1e-3, async_buffer_size=8,
        update_weights_interval=1, max_staleness=1, partial_rollout=True, use_tis=True,
        check_weight_update_equal=True, run_dir=str(tmp_path / "run"), rollout_stream=fault == "freeze",
        rollout_health_check_interval=0.5, rollout_health_check_timeout=3.0, use_fault_tolerance=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    sig = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
    try:
        with signal_after_step(metrics, 2, box, sig) as done:
            summary = run(args)
    finally:
        if fault == "freeze" and "pid" in box:  # the pool killed it; make sure, by its pid, before Ray goes
            try:
                os.kill(box["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert done.is_set()
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps_rows = [r for r in rows if "reward" in r]
    assert len(steps_rows) == steps

    # nothing failed or lost for the dead engine: its requests went to the live one
    ledger = summary["ledger"]
    assert ledger["trained"] == steps * 4 and summary["manager"]["groups_failed"] == 0
    assert {k for k, v in ledger.items() if v} <= {"trained", "queued", "partial"}  # partial: cut by the stop
    if "tokens" in summary:  # the token ledger: generated = trained + discarded + carried
        assert summary["tokens"]["balanced"], summary["tokens"]

    # counted once, and a replacement joined: two engines again, both holding exactly the trainer's weights
    assert steps_rows[-1]["engine_failures"] == 1 and steps_rows[-1]["engine_restarts"] == 1
    assert steps_rows[-1]["engines_live"] == 2
    assert summary["weight_check_max_diff"] == 0.0
    assert summary["version"] == steps
