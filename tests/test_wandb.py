"""wandb, offline (no account, no network): slime's flags, step metrics in the offline run, a resumed job continues
the same run, and an e2e `train_async.py --use-wandb` job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamrl.config import default_args
from streamrl.metrics import MetricsLogger

wandb = pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parents[1]


def history(wandb_dir: Path, run_id: str) -> list[dict]:
    """Every history row of the offline runs with this id (a resume writes a second offline-run directory)."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    rows = []
    for f in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        ds = datastore.DataStore()
        ds.open_for_scan(str(f))
        while (data := ds.scan_data()) is not None:
            rec = pb.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_offline_run_holds_step_metrics_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = default_args(use_wandb=True, wandb_group="exp", wandb_project="p", num_rollout=4, save=str(tmp_path / "ck"))
    log = MetricsLogger(args, tmp_path, total_steps=4)
    for step in (1, 2, 3):
        log.log({"step": step, "reward": step / 10, "ok": True})
    log.log({"step": 1, "eval/reward": 0.5})  # an eval lands after later steps: kept, at its own step
    pos = log.position()
    log.close()
    saved = json.loads((tmp_path / "wandb.json").read_text())
    assert saved["group"].startswith("exp_") and len(saved["group"]) > len("exp_")  # slime's random suffix
    # a resumed job, same --run-dir; its own --wandb-dir only because wandb names an offline run directory by the
    # second it started plus the run id, and this resume starts within the same second
    args.wandb_dir = str(tmp_path / "resumed")
    log = MetricsLogger(args, tmp_path, total_steps=4, resume_offset=pos)
    log.log({"step": 4, "reward": 0.4})
    log.close()
    assert json.loads((tmp_path / "wandb.json").read_text()) == saved  # same run id and group
    args.load, args.wandb_dir = str(tmp_path / "ck"), str(tmp_path / "resumed2")  # a resume into a new --run-dir
    MetricsLogger(args, tmp_path / "run2", total_steps=4, resume_offset=0).close()
    assert json.loads((tmp_path / "run2" / "wandb.json").read_text()) == saved
    rows = history(tmp_path, saved["id"]) + history(tmp_path / "resumed", saved["id"])
    assert [(r["step"], r["reward"]) for r in rows if "reward" in r] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r] == [(1, 0.5)]


def test_slime_flags_reach_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or pytest.fail("stop"))
    args = default_args(use_wandb=True, wandb_group="g", disable_wandb_random_suffix=True, wandb_team="team",
                        wandb_run_id="myrun", wandb_dir=str(tmp_path / "wb"), wandb_mode="disabled")
    with pytest.raises(pytest.fail.Exception):
        MetricsLogger(args, tmp_path, total_steps=1)
    assert (seen["group"], seen["name"], seen["entity"], seen["id"], seen["resume"], seen["mode"], seen["dir"]) == \
        ("g", "g", "team", "myrun", "allow", "disabled", str(tmp_path / "wb"))


@pytest.mark.slow
def test_e2e_job_with_use_wandb_offline(tmp_path, tiny_ckpt, sort_data):
    train, _ = sort_data
    run_dir = tmp_path / "run"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true",
           "HOME": str(tmp_path)}  # no ~/.netrc, no account: offline needs none
    r = subprocess.run(
        [sys.executable, "train_async.py", "--hf-checkpoint", tiny_ckpt, "--prompt-data", train, "--label-key",
         "label", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--num-rollout", "3",
         "--rollout-max-response-len", "4", "--rollout-num-engines", "1", "--engine-torch-threads", "1",
         "--train-torch-threads", "1", "--use-wandb", "--wandb-project", "e2e", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    rows = [row for row in history(run_dir, run_id) if "reward" in row]
    assert [row["step"] for row in rows] == [1, 2, 3] and all("samples_per_s" in row for row in rows)
    assert (run_dir / "ray_logs").is_symlink() and (run_dir / "ray_logs" / "raylet.out").is_file()
    # no Ray process's "cannot reach the metrics exporter agent" line is forwarded to the console (the driver's
    # own, written by Ray's C++ core straight to stderr, may remain: one line)
    noise = [ln for ln in (r.stdout + r.stderr).splitlines() if "metrics exporter" in ln]
    assert len(noise) <= 1 and not any("(raylet)" in ln or "(pid=" in ln for ln in noise), noise
