"""End to end: `train.py --colocate` on CPU (one embedded engine, one FSDP rank, taking turns), and
`train_async.py --colocate` refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "megatron"])
def test_train_py_colocate_takes_turns(tiny_ckpt, sort_data, tmp_path, backend):
    if backend == "megatron":
        pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    train, _ = sort_data
    run_dir = tmp_path / "run"
    argv = ["--hf-checkpoint", tiny_ckpt, "--prompt-data", train, "--label-key", "label", "--rm-type", "sort",
            "--num-rollout", "3", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--rollout-max-response-len", "8", "--micro-batch-size", "4", "--colocate",
            "--engine-dtype", "bfloat16",  # converted on load, so the engine's weight storages really shrink
            "--run-dir", str(run_dir), "--train-backend", backend]
    out = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sync_mode"] and summary["ledger"]["trained"] == 3 * 2 and summary["tokens"]["balanced"]
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in steps if "reward" in r and "loss" in r]
    assert len(steps) == 3 and all(r["staleness_max"] == 0 for r in steps) and steps[-1]["version"] == 3
    for r in steps:  # every step: release, onload, train, resume weights, sync, offload, resume KV, in this order
        assert r["colocate_release_time"] >= 0 and r["trainer_onload_time"] >= 0 and r["trainer_offload_time"] >= 0
        order = [r[f"colocate_t_{p}"] for p in ("generate", "release", "train", "sync", "offload")]
        assert order == sorted(order) and r["colocate_resume_kv_time"] >= 0
    assert sum(r["colocate_t_train"] - r["colocate_t_release"] for r in steps) < 60


@pytest.mark.slow
def test_no_offload_keeps_trainer_and_engine_resident(tiny_ckpt, sort_data, tmp_path):
    """slime's --no-offload-train / --no-offload-rollout: the turns stay (engines paused while the trainer
    trains), nothing moves off the GPU: no offload, onload, release or resume in the step metrics."""
    train, _ = sort_data
    run_dir = tmp_path / "run"
    argv = ["--hf-checkpoint", tiny_ckpt, "--prompt-data", train, "--label-key", "label", "--rm-type", "sort",
            "--num-rollout", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--rollout-max-response-len", "8", "--micro-batch-size", "4", "--colocate", "--no-offload-train",
            "--no-offload-rollout", "--run-dir", str(run_dir)]
    out = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ledger"]["trained"] == 2 * 2 and summary["tokens"]["balanced"]
    steps = [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").open()) if "reward" in r and "loss" in r]
    assert len(steps) == 2 and steps[-1]["version"] == 2
    moved = ("trainer_offload_time", "trainer_onload_time", "colocate_release_time", "colocate_resume_weights_time",
             "colocate_resume_kv_time")
    assert not [k for r in steps for k in moved if k in r]
    assert all(r["colocate_t_release"] <= r["colocate_t_train"] <= r["colocate_t_sync"] for r in steps)


def test_train_async_colocate_is_one_line():
    out = subprocess.run([sys.executable, "train_async.py", "--colocate", "--hf-checkpoint", "x",
                          "--prompt-data", "y"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    err = out.stderr.strip()
    assert out.returncode != 0 and err.startswith("streamrl: error: --colocate needs train.py")
    assert len(err.splitlines()) == 1
