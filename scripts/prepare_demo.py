"""Build what the demo needs, offline: a tiny random-init Qwen3 with the in-repo tokenizer, task data, SFT warm-up.

    python scripts/prepare_demo.py --out outputs/demo [--task sort] [--sft-steps 300]

Writes <out>/base (random init), <out>/sft (after warm-up; `--sft-steps 0` skips it: RL then starts from <out>/base),
<out>/{sft,train,eval}.jsonl. The SFT data has noisy
labels (`--sft-noise` of answers are near misses), so the warm-up teaches the format and part of the skill and
leaves the rest to RL. Skips steps whose outputs exist.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--task", default="sort")
    p.add_argument("--length", type=int, default=4)
    p.add_argument("--arch", default="qwen3", choices=["qwen3", "llama"])
    p.add_argument("--sft-steps", type=int, default=300, help="0: no warm-up (RL from the random init)")
    p.add_argument("--sft-noise", type=float, default=0.85)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-eval", type=int, default=128)
    a = p.parse_args()

    from streamrl.models.tiny import build_tiny_model
    from streamrl.tasks.synthetic import write_task_jsonl

    out = Path(a.out)
    if not (out / "base" / "config.json").exists():
        build_tiny_model(out / "base", arch=a.arch)
    write_task_jsonl(out / "sft.jsonl", a.task, 20000, seed=1, length=a.length, noise=a.sft_noise)
    write_task_jsonl(out / "train.jsonl", a.task, a.n_train, seed=2, length=a.length)
    write_task_jsonl(out / "eval.jsonl", a.task, a.n_eval, seed=3, length=a.length)
    if a.sft_steps < 0:
        p.error("--sft-steps must be >= 0")
    if a.sft_steps == 0:
        print(f"[prepare] ready (no SFT): {out}/base, {out}/train.jsonl, {out}/eval.jsonl")
        return
    if not (out / "sft" / "config.json").exists():
        from pipelines.sft import main as sft_main

        sft_main(["--hf-checkpoint", str(out / "base"), "--prompt-data", str(out / "sft.jsonl"),
                  "--label-key", "label", "--num-rollout", str(a.sft_steps), "--lr", "3e-3",
                  "--global-batch-size", "64", "--n-samples-per-prompt", "1", "--train-torch-threads", "2",
                  "--save", str(out / "sft")])
    print(f"[prepare] ready: {out}/sft, {out}/train.jsonl, {out}/eval.jsonl")


if __name__ == "__main__":
    main()
