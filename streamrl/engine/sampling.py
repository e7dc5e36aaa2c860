"""Batched token sampling with temperature / top-p / top-k, plus the log-probs RL needs. Pure torch.

Log-prob convention (what `output_token_logprobs` reports): log_softmax(logits / T)[token] over the FULL vocabulary,
i.e. temperature-scaled but not renormalised after top-p / top-k truncation. Greedy (T == 0) uses T = 1. This is the
quantity a trainer recomputes from its own logits, so the two can be compared token by token.
"""

from __future__ import annotations

import torch

GREEDY_EPS = 1e-6  # temperatures below this are greedy (SGLang does the same)


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    top_ks: torch.Tensor,
    generators: list[torch.Generator | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: [B, V] float logits of the next token.
        temperatures: [B]; rows below GREEDY_EPS take the argmax.
        top_ps: [B] in (0, 1]; keep the smallest prefix of the sorted distribution whose mass reaches top_p.
        top_ks: [B]; <= 0 means off.
        generators: optional per-row torch.Generator (per-request `sampling_seed`); None rows use torch's default.

    Returns:
        (tokens [B] int64, logprobs [B] float32) with the log-prob convention of the module docstring.
    """
    logits = logits.float()
    bsz, vocab = logits.shape
    greedy = temperatures < GREEDY_EPS
    temps = torch.where(greedy, torch.ones_like(temperatures), temperatures).to(logits).unsqueeze(1)
    scaled = logits / temps
    logprobs_full = torch.log_softmax(scaled, dim=-1)

    uniforms = torch.rand(bsz, dtype=torch.float64)
    if generators is not None:
        for i, g in enumerate(generators):
            if g is not None:
                uniforms[i] = torch.rand((), generator=g, dtype=torch.float64)
    truncate = bool(((top_ps < 1.0) | (top_ks > 0)).any())
    if truncate:
        # Sort once; both truncations are masks over the sorted order (SGLang's torch fallback does the same).
        sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(dim=-1)
        top_ps = top_ps.to(probs).unsqueeze(1)
        # Drop a token when the mass strictly before it already exceeds top_p; skip rows with top_p == 1 so float
        # rounding of the cumsum cannot clip the far tail.
        drop = ((cum - probs) > top_ps) & (top_ps < 1.0)
        ks = torch.where(top_ks > 0, top_ks, torch.full_like(top_ks, vocab)).unsqueeze(1)
        drop |= torch.arange(vocab, device=logits.device).unsqueeze(0) >= ks
        drop[:, 0] = False  # always keep the most likely token
        probs = probs.masked_fill(drop, 0.0)
    else:  # no truncation anywhere: sample in vocabulary order, no sort (the sort dominates on large vocabularies)
        probs, sorted_idx = logprobs_full.exp(), None

    # Inverse-CDF sampling with one uniform per row: batched, yet each seeded row draws only from its own
    # generator, so a seeded request is reproducible whatever else shares the batch.
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
    sampled = sorted_idx.gather(1, pos).squeeze(1) if sorted_idx is not None else pos.squeeze(1)

    tokens = torch.where(greedy.to(logits.device), logits.argmax(dim=-1), sampled)
    return tokens, logprobs_full.gather(1, tokens.unsqueeze(1)).squeeze(1)
