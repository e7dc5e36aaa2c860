"""Loss reductions whose gradient does not depend on micro-batching or on the number of data-parallel ranks.

The global batch has N samples, split over W ranks and, on each rank, over micro-batches. Every reduction below is
a plain SUM over the micro-batch's samples/tokens divided by a GLOBAL constant, so summing it over micro-batches
and ranks gives exactly the full-batch value, and so does the gradient:

    sample_mean (slime default)   R = (1/N) Σ_i Σ_t v_it·m_it / D_i          D_i = max(Σ_t m⁰_it, 1)
    token_mean  (--calculate-per-token-loss)   R = Σ_{i,t} v_it·m_it / N_tok,  N_tok = Σ_i max(Σ_t m⁰_it, 1) global
    constant    (Dr. GRPO, --loss-normalizer-constant C)   R = Σ_{i,t} v_it·m_it / (C·N)

m⁰ is the original loss mask and m the mask actually applied (IcePop / rejection sampling may zero tokens): a
rejected token leaves the numerator but keeps the denominator, so rejecting tokens never re-weights the others.
A sample whose mask is all zero (tool-only response, `remove_sample`) contributes 0 yet still counts in N, and as
one token in N_tok (slime's count), so masking a sample never re-weights the others in either mode.

The trainer backpropagates R·W on each rank for each micro-batch: gradients accumulate over micro-batches, and FSDP
averages them over the W ranks (÷W), so the step's gradient is ∇R of the whole batch. N_tok must therefore be
the all-reduced count over ranks, computed before the micro-batch loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

ReduceMode = Literal["sample_mean", "token_mean", "constant"]


def token_count(mask: Tensor) -> Tensor:
    """N_tok of the token_mean reduction over `mask` [B, T]: Σ_i max(Σ_t m_it, 1) (a fully masked sample counts as
    one token, as in slime)."""
    return mask.sum(-1).clamp(min=1).sum()


def masked_sample_mean_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_i ( Σ_t v[i,t]·m[i,t] / max(Σ_t m[i,t], 1) ): per-sample token mean, summed over samples. [B, T] -> scalar.

    A sample with an all-zero mask contributes 0. The caller divides by the global number of samples.
    """
    m = mask.to(values.dtype)
    return ((values * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum()


def masked_token_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_{i,t} v[i,t]·m[i,t] (per-token mode). The caller divides by the global number of unmasked tokens."""
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ v·m / max(Σ m, 1) over all elements (plain mean when mask is None). For logging, not for losses."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def reduce_metrics(metrics: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """{name: masked_sample_mean_sum(value, mask)} for per-token metric tensors, detached.

    Summing these over micro-batches and ranks and dividing by the global number of samples gives the sample mean
    of token means, consistent with the default loss reduction.
    """
    return {k: masked_sample_mean_sum(v.detach(), mask) for k, v in metrics.items()}


@dataclass(frozen=True)
class LossReducer:
    """R(values, mask, denom_mask) for one micro-batch, normalised by global constants (see the module docstring).

    `num_samples` N is the global batch size, `num_tokens` N_tok the global count of unmasked tokens (all-reduced
    over ranks; only used by token_mean), `constant` C (only used by constant).
    """

    mode: ReduceMode = "sample_mean"
    num_samples: int = 1
    num_tokens: float = 1.0
    constant: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("sample_mean", "token_mean", "constant"):
            raise ValueError(f"unknown reduction {self.mode!r}")
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if self.mode == "constant" and not (self.constant and self.constant > 0):
            raise ValueError("the constant reduction needs constant > 0")

    def __call__(self, values: Tensor, mask: Tensor, denom_mask: Tensor | None = None) -> Tensor:
        """Σ over this micro-batch of v·m, divided by the mode's denominators (from `denom_mask`, default `mask`)."""
        m = mask.to(values.dtype)
        num = values * m
        if self.mode == "sample_mean":
            d = (mask if denom_mask is None else denom_mask).to(values.dtype).sum(-1).clamp(min=1.0)
            return (num.sum(-1) / d).sum() / self.num_samples
        if self.mode == "token_mean":
            return num.sum() / max(float(self.num_tokens), 1.0)
        return num.sum() / (float(self.constant) * self.num_samples)

    def metrics(self, metrics: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """{name: R(value, mask)} for per-token metric tensors, detached; sum over micro-batches and ranks."""
        return {k: self(v.detach(), mask) for k, v in metrics.items()}
