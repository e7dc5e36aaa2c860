"""End to end: a short async job whose weight syncs go by `--update-weight-transport distributed` (SGLang's
weight-update group; gloo on CPU, NCCL between GPUs), checked exact after the last sync."""

import json

import pytest

from streamrl.config import default_args

pytestmark = pytest.mark.slow


def test_async_job_syncs_by_broadcast_exactly(ray_cluster, tiny_ckpt, sort_data, tmp_path):
    from pipelines.async_loop import run

    train, _ = sort_data
    args = default_args(
        hf_checkpoint=tiny_ckpt, prompt_data=train, label_key="label", rollout_num_engines=2,
        rollout_batch_size=2, n_samples_per_prompt=2, micro_batch_size=4, num_rollout=3, rollout_max_response_len=16,
        lr=1e-3, update_weights_interval=1, check_weight_update_equal=True, run_dir=str(tmp_path / "run"),
        update_weight_transport="distributed", update_weight_buffer_size=256 * 1024,  # several buckets
    )
    summary = run(args)
    assert summary["weight_check_max_diff"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    syncs = [r for r in rows if "sync_connect_time" in r]  # only this transport forms a group
    assert len(syncs) >= 3 and all(r["sync_buckets"] > 1 for r in syncs)
