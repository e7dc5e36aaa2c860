"""Per-token RL losses (PPO clip, KL, TIS, entropy) and the reductions that turn them into a scalar.

Notation per response token t of sample i: ℓθ current log-prob (with grad), ℓold proximal log-prob recomputed by the
trainer at the start of the step, ℓroll behaviour log-prob recorded by the engine, ℓref reference-model log-prob,
m mask, A advantage. Everything here is elementwise over [B, T] (or any shape) except the reductions.

How the trainer reduces (slime's default "sample mean of token means"):

    global batch: N samples, split over W data-parallel ranks and micro-batches on each rank.
    per micro-batch:  loss_mb = masked_sample_mean_sum(L, m) / N × W        (per-sample token mean, summed)
    backward on each loss_mb (gradients accumulate), then FSDP averages gradients over the W ranks (÷W).

Because masked_sample_mean_sum is a plain sum over samples of per-sample quantities, the accumulated gradient is
∇ (1/N) Σ_i mean_t(L_i) whatever the micro-batch size and the number of ranks (tests check this). With
`masked_token_sum` instead (per-token mode), divide by the global number of unmasked tokens instead of N.
Metrics are reduced the same way: `reduce_metrics` gives per-micro-batch sums; add them up and divide by N.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3", "low_var_kl"]


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


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor, kind: KLKind = "low_var_kl") -> Tensor:
    """Per-token estimate of KL(π‖πref) from samples of π (Schulman), δ = ℓ − ℓref:

    k1 = δ;  k2 = δ²/2;  k3 = e^{−δ} − 1 + δ;  low_var_kl = clamp(k3, −10, 10).
    """
    delta = log_probs - ref_log_probs
    if kind == "k1":
        return delta
    if kind == "k2":
        return delta.square() / 2
    if kind in ("k3", "low_var_kl"):
        k3 = torch.exp(-delta) - 1 + delta
        return k3.clamp(-10.0, 10.0) if kind == "low_var_kl" else k3
    raise ValueError(f"unknown KL estimator {kind!r}: expected k1, k2, k3 or low_var_kl")


def tis_weights(
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    clip_high: float,
    clip_low: float = 0.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance weights w = clamp(exp(ℓold − ℓroll), clip_low, clip_high), detached.

    Corrects for sampling from the behaviour policy (engine, possibly stale weights) instead of the proximal π_old.
    Metrics (masked token means, detached scalars): `tis` = mean raw ratio exp(ℓold − ℓroll) (as slime logs it),
    `tis_clipfrac` = fraction of tokens whose ratio was clipped, `tis_abs` = mean |ratio − 1|.
    On-policy (ℓold == ℓroll) every weight is exactly 1.
    """
    with torch.no_grad():
        ratio = torch.exp(old_log_probs.detach() - rollout_log_probs.detach())
        w = ratio.clamp(min=clip_low, max=clip_high)
        metrics = {
            "tis": masked_mean(ratio, mask),
            "tis_clipfrac": masked_mean((w != ratio).to(ratio.dtype), mask),
            "tis_abs": masked_mean((ratio - 1).abs(), mask),
        }
    return w, metrics


def ppo_clip_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO clipped surrogate (to minimise) and clip indicator.

    ρ = exp(ℓθ − ℓold);  L = max(−ρ·A, −clip(ρ, 1−ε, 1+ε_high)·A);  clipfrac = 1 where the clipped term is larger
    (i.e. where the gradient is cut). ε_high defaults to ε (DAPO clip-higher sets it larger). `advantages` may be
    per token (same shape) or per sample ([B] against [B, T]).
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    if advantages.dim() == log_probs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(log_probs.dtype)


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    tis_weights: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
    kl_loss_coef: float = 0.0,
    kl_loss_type: KLKind = "low_var_kl",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token policy loss  L = w·L_ppo(ℓθ, ℓold, A) + β·KL(ℓθ, ℓref) − c_H·H.

    w: TIS weights (from `tis_weights`, detached; omitted = 1); the KL term only when `ref_log_probs` is given
    (β = kl_loss_coef, estimator kl_loss_type); the entropy bonus only when `entropy` (token entropy of the
    temperature-scaled logits, with grad) is given (c_H = entropy_coef). Reduce L with `masked_sample_mean_sum`.
    Metrics are detached per-token tensors (reduce them with `reduce_metrics`): pg_loss (after TIS), pg_clipfrac,
    ppo_kl = ℓold − ℓθ, and kl_loss / entropy when those terms are present.
    """
    pg, clipfrac = ppo_clip_loss(log_probs, old_log_probs, advantages, eps_clip, eps_clip_high)
    if tis_weights is not None:
        pg = pg * tis_weights.detach()
    loss = pg
    metrics = {"pg_loss": pg.detach(), "pg_clipfrac": clipfrac, "ppo_kl": (old_log_probs - log_probs).detach()}
    if ref_log_probs is not None:
        kl = kl_estimate(log_probs, ref_log_probs, kl_loss_type)
        loss = loss + kl_loss_coef * kl
        metrics["kl_loss"] = kl.detach()
    if entropy is not None:
        loss = loss - entropy_coef * entropy
        metrics["entropy"] = entropy.detach()
    return loss, metrics


def sft_loss(log_probs: Tensor, mask: Tensor) -> Tensor:
    """−Σ_i mean_t ℓ[i,t] over masked tokens (negative log-likelihood, per-sample token mean summed over samples).

    Same reduction as the policy loss: the caller divides by the global number of samples (× world size).
    """
    return -masked_sample_mean_sum(log_probs, mask)


def reduce_metrics(metrics: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """{name: masked_sample_mean_sum(value, mask)} for per-token metric tensors, detached.

    Summing these over micro-batches and ranks and dividing by the global number of samples gives the sample mean
    of token means, consistent with the loss.
    """
    return {k: masked_sample_mean_sum(v.detach(), mask) for k, v in metrics.items()}
