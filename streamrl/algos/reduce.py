"""Loss reductions whose gradient does not depend on micro-batching or on the number of data-parallel ranks.

The global batch has N samples, split over W ranks and, on each rank, over micro-batches. Every reduction below is
a plain SUM over the micro-batch's samples/tokens divided by a GLOBAL constant, so summing it over micro-batches
and ranks gives exactly the full-batch value, and so does the gradient:

    sample_mean (slime default)   R = (1/N) Σ_i Σ_t v_it·m_it / D_i          D_i = max(Σ_{j ∈ r(i)} Σ_t m⁰_jt, 1)
    token_mean  (--calculate-per-token-loss)   R = Σ_{i,t} v_it·m_it / N_tok,  N_tok = Σ_i max(Σ_t m⁰_it, 1) global
    constant    (Dr. GRPO, --loss-normalizer-constant C)   R = Σ_{i,t} v_it·m_it / (C·N)

r(i) is sample i's rollout (slime's per-rollout denominators, `rollout_mask_sums`): the samples that share a
`Sample.rollout_id` (one rollout a plug-in split into several training samples) are one term of the mean, their
tokens weighted alike, and N counts rollouts. A sample without a rollout_id is a rollout of its own, so by default
D_i is the sample's own mask sum and N the number of samples.

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


def rollout_mask_sums(rollout_ids: list[int], mask_sums: list[float]) -> list[float]:
    """Per sample, the loss-mask total of its whole rollout: Σ of `mask_sums` over the samples sharing its id
    (slime's `rollout_mask_sums`, computed where every sample of the step is visible)."""
    total: dict[int, float] = {}
    for rid, s in zip(rollout_ids, mask_sums, strict=True):
        total[rid] = total.get(rid, 0.0) + s
    return [total[rid] for rid in rollout_ids]


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
    """R(values, mask, denom) for one micro-batch, normalised by global constants (see the module docstring).

    `num_samples` N is the global number of rollouts of the step (samples, unless plug-ins grouped them),
    `num_tokens` N_tok the global count of unmasked tokens (all-reduced over ranks; only used by token_mean),
    `constant` C (only used by constant).
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

    def __call__(self, values: Tensor, mask: Tensor, denom: Tensor | None = None) -> Tensor:
        """Σ over this micro-batch of v·m, divided by the mode's denominators. `denom`: the mask whose per-sample
        sums are D_i ([B, T], default `mask`), or the D_i themselves ([B], per-rollout denominators)."""
        m = mask.to(values.dtype)
        num = values * m
        if self.mode == "sample_mean":
            d = (mask if denom is None else denom).to(values.dtype)
            d = d.sum(-1) if d.dim() == values.dim() else d
            return (num.sum(-1) / d.clamp(min=1.0)).sum() / self.num_samples
        if self.mode == "token_mean":
            return num.sum() / max(float(self.num_tokens), 1.0)
        return num.sum() / (float(self.constant) * self.num_samples)

    def metrics(self, metrics: dict[str, Tensor], mask: Tensor, denom: Tensor | None = None) -> dict[str, Tensor]:
        """{name: R(value, mask, denom)} for per-token metric tensors, detached; sum over micro-batches and ranks."""
        return {k: self(v.detach(), mask, denom) for k, v in metrics.items()}
