"""Packed sequences (`--qkv-format thd`): a micro-batch as one flat token stream, no padding.

The B (prompt + response) sequences of a micro-batch are laid back to back as input_ids [1, N] (N = their total
length) with position_ids restarting at 0 for each, so RoPE sees every sample as it would alone. Attention must not
cross samples: with sdpa and flex_attention, transformers reads the document boundaries from the restarting
position_ids (attention_mask None, no cache) and builds a block-diagonal causal mask (flex skips the empty blocks);
with `--attn-implementation varlen` (attention.py) the boundaries go to FlashAttention as `cu_seqlens`. Nothing is
computed for padding, and the LM head runs on the response positions only (`ChunkedLogProbHead`).

Results come back as the padded [B, Rmax] tensors the objective uses, so the loss code does not change: response
token j of sample i (prompt length p) is predicted by the hidden state at stream index start_i + p − 1 + j.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor

from streamrl.algos.logprobs import (
    ChunkedLogProbHead,
    ResponseLogProbs,
    entropy_from_logits,
    output_head,
    token_log_probs,
)


class PackedStream(NamedTuple):
    input_ids: Tensor  # [1, N]: the B sequences back to back
    position_ids: Tensor  # [1, N]: 0..len_i-1 for each sequence
    cu_seqlens: Tensor  # [B + 1] int32: sequence i is stream[cu[i]:cu[i+1]]
    max_len: int  # longest sequence
    positions: Tensor  # [1, R]: stream index of the hidden state that predicts each response token (R = Σ r_i)
    targets: Tensor  # [1, R]: the response tokens
    mask: Tensor  # [B, Rmax] bool: where the R per-token values go in the padded layout (row-major order)

    def attention_kwargs(self) -> dict[str, Any]:
        """The varlen boundaries, passed through the model's forward to the attention function (FlashAttention's
        kwarg names, which transformers forwards untouched; sdpa and flex ignore them)."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens, "max_length_q": self.max_len,
                "max_length_k": self.max_len}

    def to(self, device: torch.device | str) -> PackedStream:
        return PackedStream(*(x.to(device) if isinstance(x, Tensor) else x for x in self))


def pack_stream(batch_tokens: list[list[int]], prompt_lengths: list[int], response_lengths: list[int]
                ) -> PackedStream:
    """Lay B sequences out as one stream (module docstring); validates as `pack_responses` does."""
    b = len(batch_tokens)
    if not (len(prompt_lengths) == len(response_lengths) == b) or b == 0:
        raise ValueError(f"need B>0 equal-length lists: {b} sequences, {len(prompt_lengths)} prompt lengths, "
                         f"{len(response_lengths)} response lengths")
    for i, (toks, p, r) in enumerate(zip(batch_tokens, prompt_lengths, response_lengths, strict=True)):
        if p < 1 or r < 0 or len(toks) != p + r:
            raise ValueError(f"sample {i}: need prompt_length >= 1 and len(tokens) == prompt + response, got "
                             f"len={len(toks)}, prompt={p}, response={r}")
    lengths = torch.tensor([len(t) for t in batch_tokens])
    p_t, r_t = torch.tensor(prompt_lengths), torch.tensor(response_lengths)
    ids = torch.tensor(list(chain.from_iterable(batch_tokens)), dtype=torch.long)
    ends = lengths.cumsum(0)
    starts = ends - lengths
    pos_ids = torch.arange(len(ids)) - starts.repeat_interleave(lengths)
    r_total = int(r_t.sum())
    # stream index of the hidden state predicting response token j of sample i: start_i + p_i − 1 + j
    offset = torch.arange(r_total) - (r_t.cumsum(0) - r_t).repeat_interleave(r_t)
    positions = (starts + p_t - 1).repeat_interleave(r_t) + offset
    mask = torch.arange(max(int(r_t.max()), 1)).unsqueeze(0) < r_t.unsqueeze(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), ends.to(torch.int32)])
    return PackedStream(ids.unsqueeze(0), pos_ids.unsqueeze(0), cu, int(lengths.max()), positions.unsqueeze(0),
                        ids[positions + 1].unsqueeze(0), mask)


def unpack(values: Tensor, mask: Tensor) -> Tensor:
    """[R] (or [1, R]) per-response-token values -> [B, Rmax] zero-padded (differentiable)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values.reshape(-1))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def packed_response_log_probs(model: Any, batch_tokens: list[list[int]], prompt_lengths: list[int],
                              response_lengths: list[int], temperature: float = 1.0, with_entropy: bool = False,
                              entropy_grad: bool = True) -> ResponseLogProbs:
    """`response_log_probs` on one packed stream: the same values, no padding. With a `ChunkedLogProbHead` (the
    trainer installs one with --qkv-format thd) only the response positions reach the LM head, in chunks, and
    backward recomputes their logits; any other head scores every position of the stream (tests, small models)."""
    dev = _device(model)
    s = pack_stream(batch_tokens, prompt_lengths, response_lengths).to(dev)
    call = dict(input_ids=s.input_ids, position_ids=s.position_ids, use_cache=False, **s.attention_kwargs())
    head = output_head(model)  # None, or not chunked: whole logits, then the response positions picked here
    if isinstance(head, ChunkedLogProbHead):
        grad_ent = with_entropy and entropy_grad and torch.is_grad_enabled()
        with head.scoring(s.positions, s.targets, temperature, grad_ent):
            out = model(**call)
        both = (out.logits if hasattr(out, "logits") else out)[0]  # [R, 2]
        lp, ent = both[:, 0], both[:, 1]
    else:
        out = model(**call)
        logits = (out.logits if hasattr(out, "logits") else out)[0, s.positions[0]]  # [R, V]
        lp = token_log_probs(logits, s.targets[0], temperature)
        ent = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
    return ResponseLogProbs(unpack(lp, s.mask), s.mask.to(lp.dtype),
                            unpack(ent, s.mask) if with_entropy else None)


def packed_response_values(critic: Any, batch_tokens: list[list[int]], prompt_lengths: list[int],
                           response_lengths: list[int]) -> tuple[Tensor, Tensor]:
    """`critic.response_values` on one packed stream: (values [B, Rmax], response mask [B, Rmax])."""
    s = pack_stream(batch_tokens, prompt_lengths, response_lengths).to(_device(critic))
    v = critic(s.input_ids, position_ids=s.position_ids, **s.attention_kwargs())  # [1, N]
    return unpack(v[0, s.positions[0]], s.mask), s.mask.to(v.dtype)
