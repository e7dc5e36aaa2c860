"""Start RL on your own JSONL data: a fresh tiny model whose tokenizer covers your data, a train/eval split, and a
short SFT warm-up that teaches the answer format and leaves RL room to learn.

    python scripts/new_task.py --data my.jsonl --out outputs/mytask [--input-key input] [--label-key label]
        [--sft-steps 25] [--eval-size 64] [--max-positions 256]

Each line of `--data` is a JSON object with the prompt under `--input-key` and the reference answer under
`--label-key` (the default reward is exact match of the response with it). Writes <out>/base (random init),
<out>/sft (after --sft-steps of SFT on the train split; 0 skips it), <out>/train.jsonl and <out>/eval.jsonl, then
prints the train_async.py command for RL. Why few SFT steps: 300 steps memorised the answers of a small task and
RL had nothing left to gain; 20-30 teach the format only (README, "Your own task").
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="your JSONL file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input-key", default="input")
    p.add_argument("--label-key", default="label")
    p.add_argument("--sft-steps", type=int, default=25, help="SFT warm-up steps (0: RL from the random init)")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--eval-size", type=int, default=64, help="lines held out for eval (0: no eval file)")
    p.add_argument("--max-positions", type=int, default=256, help="the model's context length in characters")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        return _prepare(a)
    except (ValueError, OSError) as e:  # the data's file:line, a flag: one line, as train_async.py does
        sys.exit(f"streamrl: error: {e}")


def _prepare(a: argparse.Namespace) -> Path:
    from streamrl.config.preflight import _check_prompts
    from streamrl.models.tiny import build_tiny_model

    if a.sft_steps < 0 or a.eval_size < 0:
        raise ValueError("--sft-steps and --eval-size must be >= 0")
    _check_prompts(a.data, "--data", a.input_key, a.label_key, "metadata")
    lines = [ln for ln in Path(a.data).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if a.eval_size >= len(lines):
        raise ValueError(f"--eval-size {a.eval_size} leaves no training data ({len(lines)} lines in {a.data})")
    rows = [json.loads(ln) for ln in lines]
    chars = "".join(str(r[a.input_key]) + str(r[a.label_key]) for r in rows)
    random.Random(a.seed).shuffle(lines)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("\n".join(lines[a.eval_size:]) + "\n")
    if a.eval_size:
        (out / "eval.jsonl").write_text("\n".join(lines[: a.eval_size]) + "\n")
    base = build_tiny_model(out / "base", seed=a.seed, extra_chars=chars, max_positions=a.max_positions)
    model = base
    if a.sft_steps:
        model = out / "sft"
        cmd = [sys.executable, str(ROOT / "train_async.py"), "--loss-type", "sft_loss", "--hf-checkpoint", str(base),
               "--prompt-data", str(out / "train.jsonl"), "--input-key", a.input_key, "--label-key", a.label_key,
               "--num-rollout", str(a.sft_steps), "--global-batch-size", "64", "--n-samples-per-prompt", "1",
               "--lr", str(a.sft_lr), "--train-torch-threads", "2", "--seed", str(a.seed), "--save", str(model)]
        if subprocess.run(cmd, cwd=ROOT).returncode:
            raise SystemExit(1)  # train_async.py printed the reason
    evals = f" --eval-prompt-data {out}/eval.jsonl --eval-interval 10" if a.eval_size else ""
    print(f"[new_task] ready: {model} ({len(lines) - a.eval_size} train, {a.eval_size} eval prompts). RL:\n"
          f"  python train_async.py --hf-checkpoint {model} --prompt-data {out}/train.jsonl --input-key "
          f"{a.input_key} --label-key {a.label_key}{evals} --rollout-batch-size 16 --n-samples-per-prompt 8 "
          f"--num-rollout 100 --rollout-max-response-len 16 --lr 5e-4 --run-dir runs/{out.name}", flush=True)
    return model


if __name__ == "__main__":
    main()
