"""slime's rollout-data debugging end to end: an async job saves what each step consumed
(--save-debug-rollout-data); a train-only run on those files (--load-debug-rollout-data, no engines) reproduces the
job's training steps."""

import json
from pathlib import Path

import pytest

from streamrl.config import default_args

pytestmark = pytest.mark.slow
STEPS = 3


def test_saved_rollouts_replay_the_same_training(ray_cluster, tiny_ckpt, sort_data, tmp_path):
    from pipelines.async_loop import run
    from pipelines.debug_train import load_debug_rollout
    from pipelines.debug_train import run as run_debug

    template = str(tmp_path / "dump" / "rollout_{rollout_id}.msgpack")
    common = dict(hf_checkpoint=tiny_ckpt, label_key="label", rollout_batch_size=2, n_samples_per_prompt=4,
                  micro_batch_size=4, rollout_max_response_len=16, lr=1e-3, num_rollout=STEPS,
                  rollout_num_engines=1, actor_num_gpus_per_node=1,
                  custom_rm_path=str(Path(__file__).parent / "plugins" / "rewards.py") + ":digit_fraction")
    run(default_args(prompt_data=sort_data[0], async_buffer_size=4, max_staleness=1, partial_rollout=True,
                     save_debug_rollout_data=template, run_dir=str(tmp_path / "job"), **common))
    saved = [load_debug_rollout(template, i) for i in range(STEPS)]
    assert [d.rollout_id for d in saved] == list(range(STEPS))
    assert all(len(d.groups) == 2 and all(len(g) == 4 for g in d.groups) for d in saved)
    assert all(s.response_length > 0 and len(s.rollout_log_probs) == s.response_length
               for d in saved for g in d.groups for s in g)

    summary = run_debug(default_args(load_debug_rollout_data=template, run_dir=str(tmp_path / "replay"), **common))
    assert summary["steps"] == STEPS

    def steps(d):
        return [r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").open()) if "loss" in r]

    job, replay = steps("job"), steps("replay")
    assert len(job) == len(replay) == STEPS
    for a, b in zip(job, replay, strict=True):  # same data, same initial weights: the same steps
        for k in ("loss", "pg_loss", "grad_norm", "reward", "staleness_mean", "tis"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_bad_debug_rollout_paths_name_the_problem(tmp_path):
    from pipelines.debug_train import debug_path, load_debug_rollout

    with pytest.raises(FileNotFoundError, match=r"no file for rollout 0: .*r_0\.msgpack"):
        load_debug_rollout(str(tmp_path / "r_{rollout_id}.msgpack"), 0)
    (tmp_path / "junk_0").write_bytes(b"not msgpack")
    with pytest.raises(ValueError, match="is not a saved rollout"):
        load_debug_rollout(str(tmp_path / "junk_{rollout_id}"), 0)
    with pytest.raises(ValueError, match="only {rollout_id}"):
        debug_path("r_{step}.msgpack", 0)


def test_rollout_only_run_records_data_for_a_replay(ray_cluster, tiny_ckpt, sort_data, tmp_path):
    """--debug-rollout-only: engines and producers run, no trainer: every step's groups are consumed and saved,
    the weights and version never change, the ledger is exact; the files then train with --load-debug-rollout-data."""
    from pipelines.async_loop import run
    from pipelines.debug_train import load_debug_rollout
    from pipelines.debug_train import run as run_debug

    template = str(tmp_path / "gen" / "r_{rollout_id}.msgpack")
    common = dict(hf_checkpoint=tiny_ckpt, label_key="label", rollout_batch_size=2, n_samples_per_prompt=4,
                  micro_batch_size=4, rollout_max_response_len=16, num_rollout=STEPS, rollout_num_engines=1,
                  actor_num_gpus_per_node=1,
                  custom_rm_path=str(Path(__file__).parent / "plugins" / "rewards.py") + ":digit_fraction")
    summary = run(default_args(prompt_data=sort_data[0], async_buffer_size=4, debug_rollout_only=True,
                               save_debug_rollout_data=template, run_dir=str(tmp_path / "gen_run"), **common))
    assert summary["version"] == 0 and summary["ledger"]["trained"] == STEPS * 2
    assert sum(summary["ledger"].values()) == summary["buffer"]["admitted"] and summary["tokens"]["balanced"]
    rows = [r for r in map(json.loads, (tmp_path / "gen_run" / "metrics.jsonl").open()) if "reward" in r]
    assert len(rows) == STEPS and not any("loss" in r for r in rows)
    assert all(load_debug_rollout(template, i).version == 0 for i in range(STEPS))
    replay = run_debug(default_args(load_debug_rollout_data=template, run_dir=str(tmp_path / "replay"), lr=1e-3,
                                    **common))
    assert replay["steps"] == STEPS


def test_rollout_only_refuses_trainer_flags():
    from streamrl.config import ConfigError

    with pytest.raises(ConfigError, match="--debug-rollout-only runs no trainer: drop --save"):
        default_args(debug_rollout_only=True, save="out")
