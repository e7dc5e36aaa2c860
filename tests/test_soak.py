"""Soak: a long async job on the tiny model under every fault at once, checked at every step and at the end.

Hundreds of steps with a LIFO buffer (so queued groups go stale: regenerated, or dropped), a grader that raises, hangs
past `--rm-timeout` or returns NaN on some samples, and one of two engines killed mid-run (replaced with
`--use-fault-tolerance`). The driver checks the group ledger at every step (a broken one stops the job); this test
then asserts the job stayed exactly as async as it started (the look-ahead fills the pacing bound in the last
quarter as in the first) and that the group and token ledgers balance.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from statistics import mean

import pytest
from faultutil import signal_after_step

from streamrl.config import default_args

pytestmark = pytest.mark.slow

STEPS = 200
KILL_AT = 60


@pytest.mark.parametrize("stale_policy", ["regenerate", "drop"])
def test_soak_stays_async_and_accounts_for_everything(ray_cluster, tiny_ckpt, sort_data, tmp_path, monkeypatch,
                                                      stale_policy):
    import pipelines.async_loop as async_loop
    import pipelines.launch as launch
    from pipelines.async_loop import run

    ray = ray_cluster
    real_build, box = launch.build, {}

    def build(args):
        c = real_build(args)
        box["pid"] = ray.get(c.engines[1].pid.remote())
        return c

    monkeypatch.setattr(async_loop, "build", build)  # the loop's own reference (imported at its top)
    train, _ = sort_data
    args = default_args(
        hf_checkpoint=tiny_ckpt, prompt_data=train, label_key="label",
        custom_rm_path=str(Path(__file__).parent / "plugins" / "rewards.py") + ":flaky", rm_timeout=0.5,
        rollout_num_engines=2, actor_num_gpus_per_node=1, rollout_batch_size=2, n_samples_per_prompt=2,
        micro_batch_size=4, num_rollout=STEPS, rollout_max_response_len=8, lr=1e-4, async_buffer_size=8,
        update_weights_interval=1, max_staleness=1, partial_rollout=True, use_tis=True,
        buffer_filter_path="lifo", stale_policy=stale_policy, run_dir=str(tmp_path / "run"),
        rollout_health_check_interval=0.5, rollout_health_check_timeout=3.0, use_fault_tolerance=True,
        log_interval=50)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with signal_after_step(metrics, KILL_AT, box, signal.SIGKILL) as killed:
        summary = run(args)
    assert killed.is_set()
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r for r in rows if "reward" in r and "step" in r]
    assert len(steps) == STEPS

    # the faults happened: stale groups regenerated or dropped, samples failed (raised, timed out, NaN), an engine
    # replaced
    m, reasons = summary["manager"], summary["buffer"]["reasons"]
    stale = "regenerating" if stale_policy == "regenerate" else "dropped_stale"
    assert any(k.startswith(f"{stale}/staleness=") for k in reasons)
    assert (m["regenerated_groups"] > 0) == (stale_policy == "regenerate")
    errors = " ".join(m["errors"] + [k for k in reasons if k.startswith("failed/")])
    assert m["reward_failures"] > 0 and m["failed_samples_masked"] > 0  # only the bad samples go, not their groups
    assert steps[-1]["engine_failures"] == 1 and steps[-1]["engine_restarts"] == 1, errors

    # group ledger: every admitted group in exactly one state, nothing in flight after the stop
    ledger = summary["ledger"]
    assert sum(ledger.values()) == summary["buffer"]["admitted"] and ledger["in_flight"] == 0
    assert ledger["trained"] == STEPS * 2 and (ledger["dropped_stale"] > 0) == (stale_policy == "drop")
    # token ledger: generated = trained + discarded (by reason) + carried
    tok = summary["tokens"]
    assert tok["balanced"], tok
    reason = "stale_regenerate" if stale_policy == "regenerate" else "dropped_stale"
    assert tok["discarded"].get("failed_sample", 0) > 0 and tok["discarded"].get(reason, 0) > 0

    # exactly as async at the end as at the start: the look-ahead fills the pacing bound, and the bound moves
    # with the version ((v + K + 1) * N * B), so the slots in use track it step for step
    def full(rs):
        return mean(r["pacing_used"] >= r["pacing_limit"] - 2 for r in rs)  # at most one group settling

    first, last = steps[10:STEPS // 4], steps[-STEPS // 4:]
    wait = [b["trainer_wait_time"] - a["trainer_wait_time"] for a, b in zip(steps, steps[1:], strict=False)]
    print(json.dumps({"soak": stale_policy, "steps": STEPS, "ledger": ledger, "tokens": tok,
                      "failed_samples_masked": m["failed_samples_masked"], "groups_failed": m["groups_failed"],
                      "engine_failures": steps[-1]["engine_failures"], "full_lookahead_first": full(first),
                      "full_lookahead_last": full(last), "wait_s_first": mean(wait[10:STEPS // 4]),
                      "wait_s_last": mean(wait[-STEPS // 4:])}))  # shown with -s
    assert full(first) >= 0.8 and full(last) >= 0.8, (full(first), full(last))
    assert all(r["pacing_used"] <= r["pacing_limit"] for r in steps)
    assert mean(wait[-STEPS // 4:]) <= 2 * mean(wait[10:STEPS // 4]) + 0.05  # idle did not creep up
