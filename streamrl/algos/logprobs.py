"""Token log-probabilities and entropies from logits, and the one function that scores response tokens.

`response_log_probs` is the single place where a model is run over (prompt + response) sequences to get the
per-response-token log-probs: the trainer uses it for ℓθ, ℓold and ℓref, and the tests check it against an unpadded
per-sample computation. Conventions: the logit at position t predicts token t+1, so the response tokens of a sample
with prompt length p and response length r are scored by the logits at positions [p−1, p+r−1).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from streamrl.algos.chunked_logprobs import chunked_log_probs


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """z = logits / temperature, in float32 at least (bf16 log-softmax loses too much precision)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return z / temperature if temperature != 1.0 else z


def token_log_probs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """ℓ[b, l] = log softmax(logits[b, l] / T)[targets[b, l]] = z[targets] − logsumexp(z), z = logits / T.

    Shapes: logits [..., V], targets [...] -> [...]. Gathers the target logit and subtracts the logsumexp instead of
    materialising a full log-softmax tensor.
    """
    z = _scaled(logits, temperature)
    picked = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H[b, l] = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v, with p = softmax(z), z = logits / T.

    Shapes: logits [..., V] -> [...].
    """
    z = _scaled(logits, temperature)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


class ChunkedLogProbHead(torch.nn.Module):
    """`--log-probs-chunk-size N`: stands in for a causal LM's `lm_head` with the same weight Parameter, so state-dict
    names, weight tying and FSDP sharding do not change. Outside `scoring(...)` it returns plain logits; inside, the
    model's forward returns [B, R, 2] (log-prob, entropy) of the given response positions, computed by
    `chunked_log_probs` N tokens at a time instead of logits for every position (`response_log_probs` uses it)."""

    def __init__(self, head: torch.nn.Module, chunk: int):
        super().__init__()
        if getattr(head, "bias", None) is not None:
            raise ValueError("--log-probs-chunk-size needs an LM head without bias")
        self.weight = head.weight
        self.chunk = chunk
        self.fused = False  # --use-torch-compile: the per-chunk work compiled (chunked_logprobs.py)
        self._request: tuple[Tensor, Tensor, float, bool] | None = None

    @contextmanager
    def scoring(self, positions: Tensor, targets: Tensor, temperature: float, entropy_grad: bool):
        self._request = (positions, targets, temperature, entropy_grad)
        try:
            yield
        finally:
            self._request = None

    def forward(self, hidden: Tensor) -> Tensor:
        if self._request is None:
            return torch.nn.functional.linear(hidden, self.weight)

        positions, targets, temperature, entropy_grad = self._request
        h = gather_positions(hidden, positions)  # [B, R, C]: the response positions only
        b, r, c = h.shape
        lp, ent = chunked_log_probs(h.reshape(b * r, c), self.weight, targets.reshape(-1), temperature, self.chunk,
                                    entropy_grad, self.fused)
        return torch.stack([lp.view(b, r), ent.view(b, r)], dim=-1)


def output_head(model: Any) -> Any:
    """The model's LM head (`get_output_embeddings()`), seen through a torch DDP wrapper; None without one."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None


def use_chunked_log_probs(model: Any, chunk: int) -> None:
    """Swap an HF causal LM's `lm_head` for a `ChunkedLogProbHead` (before FSDP wraps the model)."""
    model.set_output_embeddings(ChunkedLogProbHead(model.get_output_embeddings(), chunk))


class ResponseLogProbs(NamedTuple):
    """Padded per-response-token results: `log_probs` and `entropy` are [B, Rmax], zero where `mask` is 0."""

    log_probs: Tensor
    mask: Tensor  # [B, Rmax] float, 1 for the r_i real response tokens of sample i
    entropy: Tensor | None  # only with with_entropy=True


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class PackedResponses(NamedTuple):
    """Right-padded model inputs for B (prompt + response) sequences and where their response tokens are."""

    input_ids: Tensor  # [B, Lmax]
    attention_mask: Tensor  # [B, Lmax], 1 on real tokens
    positions: Tensor  # [B, Rmax]: index of the logit (or hidden state) that predicts each response token
    targets: Tensor  # [B, Rmax]: the response tokens (clamped to a real token where padded)
    mask: Tensor  # [B, Rmax] bool, True for the r_i real response tokens of sample i


def pack_responses(
    batch_tokens: list[list[int]], prompt_lengths: list[int], response_lengths: list[int], pad_id: int = 0
) -> PackedResponses:
    """Validate and right-pad; response token j of sample i (prompt length p) is predicted at position p−1+j."""
    b = len(batch_tokens)
    if not (len(prompt_lengths) == len(response_lengths) == b) or b == 0:
        raise ValueError(
            f"need B>0 equal-length lists: {b} sequences, {len(prompt_lengths)} prompt lengths, "
            f"{len(response_lengths)} response lengths"
        )
    for i, (toks, p, r) in enumerate(zip(batch_tokens, prompt_lengths, response_lengths, strict=True)):
        if p < 1 or r < 0 or len(toks) != p + r:
            raise ValueError(
                f"sample {i}: need prompt_length >= 1 and len(tokens) == prompt + response, got "
                f"len={len(toks)}, prompt={p}, response={r}"
            )
    lmax = max(len(t) for t in batch_tokens)
    rmax = max(max(response_lengths), 1)
    input_ids = torch.full((b, lmax), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, lmax), dtype=torch.long)
    for i, toks in enumerate(batch_tokens):
        input_ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        attention_mask[i, : len(toks)] = 1
    p_t = torch.tensor(prompt_lengths, dtype=torch.long).unsqueeze(1)
    r_t = torch.tensor(response_lengths, dtype=torch.long).unsqueeze(1)
    j = torch.arange(rmax, dtype=torch.long).unsqueeze(0)
    mask = j < r_t
    pos = torch.where(mask, p_t - 1 + j, torch.zeros_like(j))
    targets = input_ids.gather(1, torch.where(mask, p_t + j, torch.zeros_like(j)))
    return PackedResponses(input_ids, attention_mask, pos, targets, mask)


def gather_positions(x: Tensor, positions: Tensor) -> Tensor:
    """x[b, positions[b, j], ...] for [B, L, ...] x and [B, R] positions -> [B, R, ...]."""
    idx = positions.to(x.device)
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def response_log_probs(
    model: Any,
    batch_tokens: list[list[int]],
    prompt_lengths: list[int],
    response_lengths: list[int],
    temperature: float = 1.0,
    pad_id: int = 0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> ResponseLogProbs:
    """Score the response tokens of B (prompt + response) sequences in one padded forward pass.

    The sequences are right-padded with `pad_id` to the longest one and run as
    `model(input_ids, attention_mask=...)` (attention_mask 1 on real tokens; right padding leaves the positions and
    the causal context of the real tokens unchanged). For sample i with prompt length p and response length r,
    log_probs[i, j] = log softmax(logits[i, p−1+j] / T)[tokens[i][p+j]] for j < r, and 0 for j ≥ r.
    The model may return an object with `.logits` or the logits tensor itself. Gradients flow when the caller
    has grad enabled (trainer: ℓθ), and not under `torch.no_grad()` (ℓold, ℓref). `entropy_grad=False` computes
    the entropy outside the autograd graph (a metric only: no [B, R, V] activations kept for backward).
    """
    packed = pack_responses(batch_tokens, prompt_lengths, response_lengths, pad_id)
    device = _model_device(model)
    head = output_head(model)
    if isinstance(head, ChunkedLogProbHead):  # --log-probs-chunk-size: the head scores the responses itself
        grad_ent = with_entropy and entropy_grad and torch.is_grad_enabled()
        with head.scoring(packed.positions.to(device), packed.targets.to(device), temperature, grad_ent):
            out = model(input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device))
        both = out.logits if hasattr(out, "logits") else out  # [B, Rmax, 2]
        mask = packed.mask.to(both.device)
        lp = both[..., 0].masked_fill(~mask, 0.0)
        ent = both[..., 1].masked_fill(~mask, 0.0) if with_entropy else None
        return ResponseLogProbs(lp, mask.to(lp.dtype), ent)
    out = model(input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device))
    logits = out.logits if hasattr(out, "logits") else out  # [B, Lmax, V]
    resp_logits = gather_positions(logits, packed.positions)  # [B, Rmax, V]
    targets, mask = packed.targets.to(logits.device), packed.mask.to(logits.device)
    lp = token_log_probs(resp_logits, targets, temperature).masked_fill(~mask, 0.0)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            src = resp_logits if entropy_grad else resp_logits.detach()
            ent = entropy_from_logits(src, temperature).masked_fill(~mask, 0.0)
    return ResponseLogProbs(lp, mask.to(lp.dtype), ent)
