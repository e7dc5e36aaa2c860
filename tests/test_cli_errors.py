"""User errors end `train_async.py` with one `streamrl: error: ...` line naming the file:line, flag or plug-in, no
traceback, before Ray or torch start (each case here runs in well under a second); `--debug` shows the traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = '{"input": "ab", "label": "ba"}\n'


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("cli")
    (d / "good.jsonl").write_text(GOOD)
    (d / "bad_json.jsonl").write_text(GOOD + '{"input": "cd" "label": "dc"}\n')
    (d / "no_key.jsonl").write_text(GOOD + '{"prompt": "cd", "label": "dc"}\n')
    (d / "no_label.jsonl").write_text(GOOD + GOOD + '{"input": "cd"}\n')
    (d / "bad_utf8.jsonl").write_bytes(GOOD.encode() + b'{"input": "c\xff\xfe", "label": "dc"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "bad_rm.py").write_text("def rm(args, sample):\n    return 1.0 +\n")
    (d / "ok_rm.py").write_text("async def rm(args, sample):\n    return 1.0\n")
    return d, tiny_ckpt


CASES = [  # (extra argv with {d} for the directory, text the one line must contain)
    (["--prompt-data", "{d}/bad_json.jsonl"], "bad_json.jsonl:2: bad JSON"),
    (["--prompt-data", "{d}/no_key.jsonl"], "no_key.jsonl:2: missing input key 'input'"),
    (["--prompt-data", "{d}/no_label.jsonl"], "no_label.jsonl:3: missing label key 'label'"),
    (["--prompt-data", "{d}/bad_utf8.jsonl"], "bad_utf8.jsonl:2: invalid UTF-8"),
    (["--prompt-data", "{d}/empty.jsonl"], "--prompt-data {d}/empty.jsonl: no prompts"),
    (["--prompt-data", "{d}/missing.jsonl"], "--prompt-data {d}/missing.jsonl: No such file"),
    (["--prompt-data", "{d}/good.jsonl", "--eval-prompt-data", "ev", "{d}/no_key.jsonl"], "no_key.jsonl:2:"),
    (["--custom-rm-path", "{d}/bad_rm.py:rm"], "--custom-rm-path: importing the plug-in failed: SyntaxError"),
    (["--custom-rm-path", "{d}/ok_rm.py:nope"], "has no function 'nope'"),
    (["--custom-rm-path", "no_such_rm"], "unknown --custom-rm-path 'no_such_rm'"),
    (["--buffer-filter-path", "no_such_filter"], "unknown buffer filter 'no_such_filter'"),
    (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (["--n-samples-per-prompt", "0"], "--n-samples-per-prompt must be >= 1, got 0"),
    (["--rollout-batch-size", "0"], "--rollout-batch-size must be >= 1, got 0"),
    (["--num-rollout", "0"], "--num-rollout must be >= 1, got 0"),
    (["--num-rollout", "-5"], "--num-rollout must be >= 1, got -5"),
    (["--rollout-max-response-len", "0"], "--rollout-max-response-len must be >= 1, got 0"),
    (["--rollout-max-response-len", "400"], "--rollout-max-response-len (400) + the prompt (at least 1 tokens)"),
    (["--eval-max-response-len", "300"], "--eval-max-response-len (300)"),
    (["--rollout-top-k", "0"], "--rollout-top-k must be -1 (off) or >= 1"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--hf-checkpoint", "{d}/no_ckpt"], "--hf-checkpoint {d}/no_ckpt: no such directory"),
    (["--hf-checkpoint", "{d}"], "not an HF checkpoint directory (no config.json)"),
    (["--use-kl-loss", "--kl-loss-coef", "0.1", "--ref-load", "{d}/no_ref"],
     "--ref-load {d}/no_ref: no such directory"),
    # SFT alike
    (["--loss-type", "sft_loss", "--num-rollout", "2", "--prompt-data", "{d}/no_label.jsonl"],
     "no_label.jsonl:3: missing label key 'label'"),
    (["--loss-type", "sft_loss", "--prompt-data", "{d}/good.jsonl"], "--loss-type sft_loss needs --num-rollout"),
]


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_async.py", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def base(d: Path, ckpt: str, extra: list[str]) -> list[str]:
    argv = ["--hf-checkpoint", ckpt, "--prompt-data", f"{d}/good.jsonl", "--label-key", "label"]
    return argv + [a.format(d=d) for a in extra]  # a later --flag overrides the earlier one


@pytest.mark.parametrize("extra, expected", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_user_error_is_one_line_without_traceback(files, extra, expected):
    d, ckpt = files
    r = run_cli(base(d, ckpt, extra))
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("streamrl: error: ") and expected.format(d=d) in lines[0], lines[0]


def test_debug_flag_shows_the_traceback(files):
    d, ckpt = files
    r = run_cli(base(d, ckpt, ["--prompt-data", "{d}/bad_json.jsonl", "--debug"]))
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and "bad_json.jsonl:2" in r.stderr
