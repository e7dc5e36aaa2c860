"""Per-token RL losses: PPO clip (asymmetric, dual clip), GSPO, CISPO, KL, entropy, value loss, SFT.

Notation per response token t of sample i: ℓθ current log-prob (with grad), ℓold proximal log-prob (recomputed by
the trainer), ℓroll behaviour log-prob recorded by the engine, ℓref reference-model log-prob, m loss mask,
A advantage. Everything here is elementwise over [B, T] and returns per-token tensors; `reduce.py` turns them into
the scalar whose gradient is independent of micro-batching and data-parallel splitting.

The decoupled three-policy objective (behaviour µ, proximal π_old, current π_θ) that the trainer assembles from
these pieces is documented in `streamrl/train/objective.py`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from streamrl.algos.reduce import masked_mean, masked_sample_mean_sum

KLKind = Literal["k1", "k2", "k3", "low_var_kl"]
PGKind = Literal["ppo", "gspo", "cispo"]


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor, kind: KLKind = "low_var_kl",
                importance_ratio: Tensor | None = None) -> Tensor:
    """Per-token estimate of KL(π‖πref) from samples of π (Schulman), δ = ℓ − ℓref:

    k1 = δ;  k2 = δ²/2;  k3 = e^{−δ} − 1 + δ;  low_var_kl = clamp(k3, −10, 10).
    `importance_ratio` ρ (--use-unbiased-kl) multiplies the estimate first, so low_var_kl clamps ρ·k3, as slime's
    `compute_approx_kl` does.
    """
    delta = log_probs - ref_log_probs
    if kind == "k1":
        kl = delta
    elif kind == "k2":
        kl = delta.square() / 2
    elif kind in ("k3", "low_var_kl"):
        kl = torch.exp(-delta) - 1 + delta
    else:
        raise ValueError(f"unknown KL estimator {kind!r}: expected k1, k2, k3 or low_var_kl")
    if importance_ratio is not None:
        kl = importance_ratio * kl
    return kl.clamp(-10.0, 10.0) if kind == "low_var_kl" else kl


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    return advantages.unsqueeze(-1) if advantages.dim() == like.dim() - 1 else advantages


def ppo_clip_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO clipped surrogate (to minimise) and clip indicator.

    ρ = exp(ℓθ − ℓold);  L = max(−ρ·A, −clip(ρ, 1−ε, 1+ε_high)·A);  clipfrac = 1 where the clipped term is larger
    (i.e. where the gradient is cut). ε_high defaults to ε (DAPO clip-higher sets it larger).
    Dual clip (`eps_clip_c` = c > 1, Ye et al. 2020): for A < 0, L = min(L, −c·A), bounding the loss of a token
    whose ratio exploded. `advantages` may be per token (same shape) or per sample ([B] against [B, T]).
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    advantages = _per_token(advantages, log_probs)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).to(log_probs.dtype)
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(f"dual clip needs eps_clip_c > 1, got {eps_clip_c}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -eps_clip_c * advantages), loss)
    return loss, clipfrac


def gspo_log_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> Tensor:
    """GSPO sequence-level log-ratio s_i = Σ_t (ℓθ − ℓold)·m / max(Σ_t m, 1), broadcast to the sample's tokens.

    exp(s_i) is the geometric mean of the token ratios (Zheng et al. 2025). Gradients flow through every token of
    the sample. Feeding ℓold + s (instead of ℓθ) to `ppo_clip_loss` gives the GSPO loss (slime's compute_gspo_kl).
    """
    m = mask.to(log_probs.dtype)
    s = ((log_probs - old_log_probs) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return s.expand_as(log_probs)


def cispo_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, eps_clip: float, eps_clip_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1): L = −sg(clip(ρ, 1−ε, 1+ε_high))·A·ℓθ, clipfrac = 1 where the ratio was clipped.

    The clipped ratio is a detached weight, so every token keeps a gradient A·w·∇ℓθ (PPO zeroes clipped tokens).
    Canonical CISPO is one-sided: pass ε ≥ 1 to disable the lower bound.
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    advantages = _per_token(advantages, log_probs)
    ratio = torch.exp(log_probs - old_log_probs).detach()
    w = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    return -w * advantages * log_probs, (w != ratio).to(log_probs.dtype)


def pg_loss(
    kind: PGKind,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The policy-gradient term of `kind` (ppo = GRPO/PPO clip, gspo, cispo): (loss, clipfrac, ppo_kl) per token.

    ppo_kl = ℓold − ℓθ per token (for gspo: −s_i, the sequence-level value each token is clipped with).
    """
    if kind == "gspo":
        s = gspo_log_ratio(log_probs, old_log_probs, mask)
        loss, clip = ppo_clip_loss(old_log_probs.detach() + s, old_log_probs.detach(), advantages, eps_clip,
                                   eps_clip_high, eps_clip_c)
        return loss, clip, -s.detach()
    if kind == "cispo":
        loss, clip = cispo_loss(log_probs, old_log_probs, advantages, eps_clip, eps_clip_high)
    elif kind == "ppo":
        loss, clip = ppo_clip_loss(log_probs, old_log_probs, advantages, eps_clip, eps_clip_high, eps_clip_c)
    else:
        raise ValueError(f"unknown policy loss {kind!r}: expected ppo, gspo or cispo")
    return loss, clip, (old_log_probs - log_probs).detach()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, value_clip: float | None = 0.2
               ) -> tuple[Tensor, Tensor]:
    """Clipped value loss (critic, --value-clip ε_v): L = max((V − R)², (V_clip − R)²), and the clip fraction
    1[|V − V_old| > ε_v] (slime's definition: the value moved past the clip, whichever term won).

    V_clip = V_old + clamp(V − V_old, −ε_v, ε_v); V_old is the critic's value before this step's update (detached).
    `value_clip=None` gives the plain squared error.
    """
    surr = (values - returns).square()
    if value_clip is None:
        return surr, torch.zeros_like(surr)
    v_clip = old_values + (values - old_values).clamp(-value_clip, value_clip)
    surr_clip = (v_clip - returns).square()
    clipped = ((values - old_values).abs() > value_clip).to(values.dtype).detach()
    return torch.maximum(surr, surr_clip), clipped


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    kind: PGKind = "ppo",
    mask: Tensor | None = None,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    tis_weights: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
    kl_loss_coef: float = 0.0,
    kl_loss_type: KLKind = "low_var_kl",
    unbiased_kl: bool = False,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token policy loss  L = w·L_pg(ℓθ, ℓold, A) + β·KL(ℓθ, ℓref) − c_H·H.

    L_pg from `pg_loss(kind)` (GSPO needs `mask`; default all ones); w: TIS weights (detached; omitted = 1); the KL
    term only when `ref_log_probs` is given (β = kl_loss_coef, estimator kl_loss_type; `unbiased_kl`: β·ρ·KL with
    ρ = exp(ℓθ − ℓold) not detached, slime's --use-unbiased-kl); the entropy bonus only when
    `entropy` (token entropy of the temperature-scaled logits, with grad) is given (c_H = entropy_coef).
    Metrics are detached per-token tensors (reduce them with `reduce_metrics`): pg_loss (after TIS), pg_clipfrac,
    ppo_kl = ℓold − ℓθ, and kl_loss / entropy when those terms are present.
    """
    if mask is None:
        mask = torch.ones_like(log_probs)
    pg, clipfrac, ppo_kl = pg_loss(kind, log_probs, old_log_probs, advantages, mask, eps_clip=eps_clip,
                                   eps_clip_high=eps_clip_high, eps_clip_c=eps_clip_c)
    if tis_weights is not None:
        pg = pg * tis_weights.detach()
    loss = pg
    metrics = {"pg_loss": pg.detach(), "pg_clipfrac": clipfrac, "ppo_kl": ppo_kl}
    if ref_log_probs is not None:
        ratio = torch.exp(log_probs - old_log_probs) if unbiased_kl else None
        kl = kl_estimate(log_probs, ref_log_probs, kl_loss_type, importance_ratio=ratio)
        loss = loss + kl_loss_coef * kl
        metrics["kl_loss"] = kl.detach()
    if entropy is not None:
        loss = loss - entropy_coef * entropy
        metrics["entropy"] = entropy.detach()
    return loss, metrics


def sft_loss(log_probs: Tensor, mask: Tensor) -> Tensor:
    """−Σ_i mean_t ℓ[i,t] over masked tokens (negative log-likelihood, per-sample token mean summed over samples).

    Per token it is just −ℓ; the trainer reduces −ℓ like every other loss (`reduce.LossReducer`).
    """
    return -masked_sample_mean_sum(log_probs, mask)


def tis_weights(
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    clip_high: float,
    clip_low: float = 0.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level truncated importance weights w = clamp(exp(ℓold − ℓroll), clip_low, clip_high), detached.

    The simplest case of `offpolicy.importance_weights` (level token, mode truncate), kept for its metrics as
    scalars: `tis` = mean raw ratio, `tis_clipfrac` = fraction of clipped tokens, `tis_abs` = mean |ratio − 1|.
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
