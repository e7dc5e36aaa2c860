"""A slime-style whole-rollout function (`--rollout-function-path examples/sync_rollout/rollout.py:generate_rollout`).

    def generate_rollout(args, rollout_id, data_source, evaluation=False) -> list[list[Sample]]

Synchronous, as in slime: it runs its own event loop. Training: takes `--over-sampling-batch-size` groups at a time
from `data_source`, generates every sample with slime's default `generate`, and returns the first
`--rollout-batch-size` groups (the producers score them with `--custom-rm-path`). Evaluation: generates each eval
dataset once and returns `{name: {"rewards": [...]}}` (here: the response length, as a stand-in score).
"""

from __future__ import annotations

import asyncio
from typing import Any

from streamrl.rollout.generate import generate
from streamrl.types import Status


def _params(args: Any, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    return {"temperature": temperature, "top_p": args.rollout_top_p, "top_k": args.rollout_top_k,
            "max_new_tokens": max_new_tokens, "no_stop_trim": True, "skip_special_tokens": False}


async def _rollout(args: Any, data_source: Any) -> list:
    kept: list = []
    while len(kept) < args.rollout_batch_size:
        groups = data_source.get_samples(args.over_sampling_batch_size)
        if not groups:
            break
        params = _params(args, args.rollout_max_response_len, args.rollout_temperature)
        todo = [s for g in groups for s in g if s.status in (Status.PENDING, Status.ABORTED)]  # surplus: done
        await asyncio.gather(*(generate(args, s, dict(params)) for s in todo))
        kept += groups
    data_source.add_samples(kept[args.rollout_batch_size:])  # the surplus is generated: keep it for later
    return kept[:args.rollout_batch_size]


async def _evaluate(args: Any) -> dict:
    from transformers import AutoTokenizer

    from streamrl.data import load_prompts
    from streamrl.types import Sample

    tok = AutoTokenizer.from_pretrained(args.hf_checkpoint)
    out = {}
    for name, path in args.eval_datasets:
        recs, _ = load_prompts(path, args.input_key, args.label_key, args.metadata_key, tokenizer=tok)
        samples = [Sample(tokens=list(r.prompt_ids), label=r.label) for r in recs]
        params = _params(args, args.eval_max_response_len, args.eval_temperature)
        await asyncio.gather(*(generate(args, s, dict(params)) for s in samples))
        out[name] = {"rewards": [float(s.response_length) for s in samples]}
    return out


def generate_rollout(args: Any, rollout_id: int, data_source: Any, evaluation: bool = False) -> Any:
    return asyncio.run(_evaluate(args) if evaluation else _rollout(args, data_source))
