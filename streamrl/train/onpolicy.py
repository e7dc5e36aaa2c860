"""`--true-on-policy-mode`: recompute π_old exactly as the embedded engine computed µ, bit for bit (CPU, fp32).

Why a plain full-sequence forward is not enough: the engine decodes with a KV cache (one prefill of the prompt,
then one [1, 1] forward per token) and the trainer scores the whole sequence in one [B, L] forward. Same weights,
same model code, but different matmul shapes, so the float32 sums run in a different order and the log-probs
differ in the last bits (measured: |ℓtrainer − ℓengine| up to ~1e-6 on the tiny model). The TIS ratio is then
1 ± 1e-6, not 1.

What makes it exact: replay the engine's own decode path, per sample, with the engine's own code
(`streamrl.engine.kv`: left_pad, KVBatch) and its log-prob convention
(log_softmax(logits.float() / T)[token], see `engine/sampling.py`). That reproduces the engine only if
the engine also ran each request alone, so:

  * the engine must decode one request at a time (`--sglang-server-concurrency 1`, which the launcher passes as
    the engine's max_running_requests): in a batch, a request's logits depend on the other rows (left padding,
    GEMM shapes), which the trainer cannot know;
  * engine and trainer use the same torch thread count (`--engine-torch-threads == --train-torch-threads`);
  * the request was not re-prefilled mid-generation (a resumed partial rollout or a weight update re-prefills the
    prefix in one forward): true in the synchronous pipeline, where nothing is in flight during a weight update.

Both first two conditions are checked by the config. With them and no staleness, ℓold == ℓroll exactly and every
TIS weight is exactly 1 (tests/algos/test_trainer.py asserts it against a live engine scheduler).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from streamrl.engine.kv import KVBatch, left_pad


def engine_replay_log_probs(model: Any, batch_tokens: list[list[int]], prompt_lengths: list[int],
                            response_lengths: list[int], temperature: float = 1.0) -> Tensor:
    """[B, Rmax] log-probs of the response tokens, computed through the engine's KV-cache decode path.

    For each sample alone: prefill the prompt (left_pad of one row), then feed each response token with its true
    position against the cache, exactly as `Scheduler._forward` + `KVBatch.step` do for a single running request.
    """
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    temps = torch.tensor([[temperature]], dtype=torch.float32, device=device)
    out = torch.zeros(len(batch_tokens), max(max(response_lengths), 1))

    def forward(ids, mask, pos, cache):
        o = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
        return o.logits[:, -1, :vocab]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, (toks, p, r) in enumerate(zip(batch_tokens, prompt_lengths, response_lengths, strict=True)):
                if r == 0:
                    continue
                ids, mask, pos = left_pad([toks[:p]])
                cache = DynamicCache()
                logits = forward(ids, mask, pos, cache)
                kv = KVBatch.from_prefill([i], cache, mask)
                for j in range(r):
                    lp = torch.log_softmax(logits.float() / temps, dim=-1)
                    out[i, j] = lp[0, toks[p + j]].item()
                    if j + 1 == r:
                        break
                    cache, mask = kv.decode_inputs()
                    logits = forward(torch.tensor([[toks[p + j]]]), mask, torch.tensor([[p + j]]), cache)
                    kv.after_decode(cache, mask)
    finally:
        model.train(was_training)
    return out
