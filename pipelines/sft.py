"""Supervised warm-up (`--loss-type sft_loss`): next-token loss on `label` given `input`, in one process.

Used by the demo to teach the tiny random-init model the task format before GRPO. Flags are the shared ones
(`--hf-checkpoint`, `--prompt-data`, `--input-key`, `--label-key`, `--lr`, `--global-batch-size`, `--num-rollout`
as the number of steps, `--save`).

    python -m pipelines.sft --hf-checkpoint ckpt/base --prompt-data sft.jsonl --num-rollout 300 --save ckpt/sft
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamrl.config import parse_args
from streamrl.data import load_prompts


def sft_batches(records, tokenizer, batch_size: int, seed: int):
    """Yield (input_ids, labels) forever: prompt tokens are masked with -100, the answer ends with EOS."""

    rng = random.Random(seed)
    order = list(range(len(records)))
    pos = len(order)
    while True:
        rows = []
        for _ in range(batch_size):
            if pos >= len(order):
                rng.shuffle(order)
                pos = 0
            rec = records[order[pos]]
            pos += 1
            answer = tokenizer(str(rec.label), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((rec.prompt_ids, answer))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        yield ids, labels


def run_sft(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.train_torch_threads))
    tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=torch.float32)
    records, skipped = load_prompts(args.prompt_data, args.input_key, args.label_key or "label", args.metadata_key,
                                    tokenizer=tokenizer, apply_chat_template=args.apply_chat_template,
                                    max_prompt_len=args.rollout_max_prompt_len)
    if skipped:
        print(f"[sft] skipped {len(skipped)} prompts, first: line {skipped[0][0]}: {skipped[0][1]}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(args.adam_beta1, args.adam_beta2))
    steps = args.num_rollout
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    batches = sft_batches(records, tokenizer, args.global_batch_size, args.rollout_seed)
    model.train()
    t0, loss_val = time.time(), float("nan")
    for step in range(steps):
        ids, labels = next(batches)
        out = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        sched.step()
        loss_val = out.loss.item()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"[sft] step {step + 1}/{steps} loss {loss_val:.4f} ({time.time() - t0:.0f}s)", flush=True)
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
    return {"final_loss": loss_val, "steps": steps, "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> None:

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(["--loss-type", "sft_loss", *argv])
    if not (args.hf_checkpoint and args.prompt_data and args.num_rollout):
        raise SystemExit("pipelines.sft needs --hf-checkpoint, --prompt-data and --num-rollout (steps)")
    run_sft(args)


if __name__ == "__main__":
    main()
