"""End to end: a short async job with 2 embedded engines and 2 FSDP CPU ranks, checked for the core guarantees."""

import json
from pathlib import Path

import pytest

from streamrl.config import default_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("pause_mode", ["abort", "in_place"])
def test_async_job_loses_nothing_and_respects_staleness(ray_cluster, tiny_ckpt, sort_data, tmp_path, pause_mode):
    from pipelines.async_loop import run

    train, evalset = sort_data
    steps = 8
    args = default_args(
        hf_checkpoint=tiny_ckpt, prompt_data=train, label_key="label", eval_prompt_data=evalset,
        custom_rm_path=str(Path(__file__).parent / "plugins" / "rewards.py") + ":digit_fraction",
        rollout_num_engines=2, actor_num_gpus_per_node=2, rollout_batch_size=4, n_samples_per_prompt=4,
        micro_batch_size=4, num_rollout=steps, rollout_max_response_len=128, lr=1e-3, async_buffer_size=8,
        update_weights_interval=1, max_staleness=1, partial_rollout=True, use_tis=True,
        check_weight_update_equal=True, run_dir=str(tmp_path / "run"),
        update_weight_transport="pinned",  # /dev/shm buckets (the resume e2e covers the HTTP default)
        use_dynamic_batch_size=True, max_tokens_per_gpu=400,  # token-budget micro-batches on the FSDP ranks
        pause_generation_mode=pause_mode,
        # 16 samples in waves on 2 engines: generation outlasts a train step, so weight updates land mid-request
        # (partial rollouts, mixed versions) in every run, not only when the machine happens to be slow
        sglang_server_concurrency=2,
    )
    summary = run(args)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    steps_rows = [r for r in rows if "reward" in r]
    assert len(steps_rows) == steps

    # nothing lost: every admitted group is trained, queued, failed/filtered with a reason, or was cut by the stop
    ledger = summary["ledger"]
    assert sum(ledger.values()) == summary["buffer"]["admitted"]
    # and every token: generated = trained + discarded + carried, with a real count on each side
    tok = summary["tokens"]
    assert tok["balanced"] and tok["generated"] == summary["manager"]["tokens_generated"] > 0
    assert 0 < tok["trained"] < tok["generated"] and tok["carried"]["in_flight"] == 0
    # pacing from the one owner: the look-ahead fills the bound (v + K + 1) * N * B and never exceeds it
    assert all(r["pacing_used"] <= r["pacing_limit"] for r in steps_rows)
    assert ledger["trained"] + ledger["queued"] + ledger["partial"] == summary["buffer"]["slots"]["limit"]
    assert ledger["trained"] == steps * 4
    assert ledger.get("failed", 0) == 0 and ledger.get("in_flight", 0) == 0
    assert summary["buffer"]["size"] == ledger.get("queued", 0)

    # staleness bounded by --max-staleness, and the loop really ran ahead (some data one version old)
    assert max(r["staleness_max"] for r in steps_rows) <= 1
    assert any(r["staleness_max"] == 1 for r in steps_rows)

    # partial rollouts: generations cut by a weight update were kept and trained with mixed versions; abort mode
    # resubmits them from the producers, in_place keeps them in the engine (no resubmission at all)
    if pause_mode == "abort":
        assert summary["manager"]["partial_resumes"] > 0
    else:
        assert summary["manager"]["partial_resumes"] == 0
    assert sum(r["mixed_version_samples"] for r in steps_rows) > 0
    assert summary["manager"]["aborted_regenerated"] == 0

    # engine busy time is reported (engine idle fraction) and grows
    busy = [r["engine_busy_time"] for r in steps_rows]
    assert 0 < busy[0] < busy[-1] and busy == sorted(busy)
    # and where its iterations went: every token trained was one engine row (some more: cut by the stop, queued)
    last = steps_rows[-1]
    assert last["engine_iterations"] > 0 and last["engine_prefill_rows"] >= ledger["trained"]
    assert last["engine_rows"] >= sum(r["response_len"] for r in steps_rows) * 16  # 4 groups x 4 samples a step
    assert last["engine_time_decode"] > 0 and last["engine_time_sample"] > 0

    # the engines hold exactly the trainer's weights after the last sync
    assert summary["weight_check_max_diff"] == 0.0
    assert summary["version"] == steps
    assert Path(summary["plot"]).stat().st_size > 1000
