"""End to end: slime's synchronous entry point `train.py` runs the same flags as train_async.py at zero lag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_train_py_is_on_policy_and_accounts_for_everything(tiny_ckpt, sort_data, tmp_path):
    train, _ = sort_data
    run_dir = tmp_path / "run"
    argv = ["--hf-checkpoint", tiny_ckpt, "--prompt-data", train, "--label-key", "label", "--rm-type", "sort",
            "--num-rollout", "3", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--rollout-max-response-len", "8", "--micro-batch-size", "4", "--async-buffer-size", "4",
            "--max-staleness", "2", "--update-weights-interval", "2",  # train.py runs at zero lag whatever these say
            "--run-dir", str(run_dir)]
    out = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sync_mode"] and summary["ledger"]["trained"] == 3 * 2 and summary["tokens"]["balanced"]
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in steps if "reward" in r and "loss" in r]
    assert len(steps) == 3 and all(r["staleness_max"] == 0 for r in steps) and steps[-1]["version"] == 3


def test_train_py_user_error_is_one_line():
    out = subprocess.run([sys.executable, "train.py", "--lr", "-1"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0 and out.stderr.strip().startswith("streamrl: error:")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
