"""The README's recipe for a new task, end to end on a second built-in task (digit reversal, not the demo's sort):
`scripts/new_task.py` builds a fresh tiny model for the user's JSONL and runs a short SFT warm-up (25 steps: the
format, not the answers), then `train_async.py` (the documented command) with a partial-credit reward lifts the
held-out reward. The warm-up must leave room: eval before RL well below the end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_VERBOSITY": "error"}


def test_new_task_recipe_sft_warmup_then_rl(tmp_path):
    from streamrl.tasks.synthetic import write_task_jsonl

    data = tmp_path / "mine.jsonl"
    write_task_jsonl(data, "reverse", 1000, seed=5, length=4)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({"question": r["input"], "answer": r["label"]}) + "\n" for r in rows))
    out = tmp_path / "task"
    prep = subprocess.run([sys.executable, "scripts/new_task.py", "--data", str(data), "--out", str(out),
                           "--input-key", "question", "--label-key", "answer", "--sft-steps", "25"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert "python train_async.py --hf-checkpoint" in prep.stdout and (out / "sft" / "config.json").is_file()
    assert len((out / "eval.jsonl").read_text().splitlines()) == 64
    run_dir = tmp_path / "run"
    rl = subprocess.run(
        [sys.executable, "train_async.py", "--hf-checkpoint", str(out / "sft"),
         "--prompt-data", str(out / "train.jsonl"), "--input-key", "question", "--label-key", "answer",
         "--eval-prompt-data", str(out / "eval.jsonl"), "--eval-interval", "1000",
         "--custom-rm-path", "streamrl.tasks.synthetic:partial_credit_rm",
         "--rollout-batch-size", "16", "--n-samples-per-prompt", "8", "--num-rollout", "60",
         "--rollout-max-response-len", "8", "--lr", "5e-4", "--async-buffer-size", "32", "--max-staleness", "1",
         "--partial-rollout", "--micro-batch-size", "32", "--rollout-num-engines", "1", "--engine-torch-threads", "1",
         "--train-torch-threads", "1", "--run-dir", str(run_dir)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rl.returncode == 0, rl.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60
    assert summary["eval_initial"] < 0.5  # the short warm-up left room
    assert summary["eval_final"] - summary["eval_initial"] > 0.12, summary
    # the summary counts the start-up too, and the last lines say what was left in the buffer and where time went
    assert summary["command_time"] > summary["wall_time"] and summary["startup_and_teardown_time"] > 0
    lines = rl.stdout.strip().splitlines()
    assert lines[-1].startswith("[streamrl] ") and " s in all: " in lines[-1] and str(run_dir) in lines[-1]
    queued = summary["ledger"]["queued"]
    assert (f"left untrained: {queued} queued" in rl.stdout) == (queued + summary["ledger"]["partial"] > 0)
