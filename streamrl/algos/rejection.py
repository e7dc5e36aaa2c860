"""Rejection of off-policy tokens and sequences, and batch normalisation of the importance weights.

Per response token t of sample i: ℓold = log π_old (detached), ℓroll = log µ, ℓθ current, A advantage, m loss mask.
Each function returns a detached keep mask (1 = stays in the loss numerators) or detached weights; a rejected token
keeps its place in the denominators (`reduce.py`), as in slime.

    rejection sampling (--use-rs)    keep ⇔ L_rs ≤ ρ ≤ U_rs, ρ = exp(log ratio at --rs-level)     `rejection_keep`
    veto (--rs-veto-threshold τ)      drop sample i if any loss token has π_old/µ < τ                `veto_keep`
    batch normalisation               w ← w / mean(w) over the micro-batch (--tis-batch-normalize)   `batch_normalized`
    OPSM (--use-opsm, δ)              drop token t of sample i if A_t < 0 and mean_t(ℓold − ℓθ) > δ  `opsm_keep`

The first three are slime's MIS example (`compute_mis_weights`, examples/train_infer_mismatch_helper/mis.py), the
last is slime's `compute_opsm_mask` (Off-Policy Sequence Masking, DeepSeek-V3.2). `mis_weights` chains them after
`offpolicy.importance_weights` in the order of slime's function: weights, then rejection, then veto, then the
normalisation of the weights (which rejection does not change).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from streamrl.algos.losses import gspo_log_ratio
from streamrl.algos.offpolicy import MAX_LOG_W, TISLevel, TISMode, importance_weights, level_log_ratio
from streamrl.algos.reduce import masked_mean, masked_sample_mean_sum


def rejection_keep(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, *, level: TISLevel,
                   low: float, high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """(keep [B, T], per-token metrics): 1 where low ≤ ρ ≤ high at `level`, times `mask`. Metrics (slime's names):
    `mis_rs_mask_fraction_low` = 1[ρ < low], `mis_rs_mask_fraction_high` = 1[ρ > high]."""
    with torch.no_grad():
        m = mask.to(old_log_probs.dtype)
        log_r = level_log_ratio((old_log_probs.detach() - rollout_log_probs.detach()) * m, m, level)
        r = torch.exp(log_r.clamp(-MAX_LOG_W, MAX_LOG_W))
        keep = mask * ((r >= low) & (r <= high)).to(mask.dtype)
        metrics = {"mis_rs_mask_fraction_low": (r < low).to(r.dtype),
                   "mis_rs_mask_fraction_high": (r > high).to(r.dtype)}
    return keep, metrics


def veto_keep(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, threshold: float
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """(keep [B, T], per-token metrics): 0 on every token of a sample with a loss token whose per-token ratio
    π_old/µ is below `threshold` (a token µ sampled that π_old almost never would: the whole sequence is suspect).
    Metrics: `mis_rs_catastrophic_token_fraction` (those tokens), `mis_rs_catastrophic_seq_fraction` (1 on every
    token of a vetoed sample)."""
    with torch.no_grad():
        log_r = old_log_probs.detach() - rollout_log_probs.detach()
        bad = (log_r < math.log(threshold)) & (mask > 0)
        seq = bad.any(-1, keepdim=True).expand_as(bad)
        metrics = {"mis_rs_catastrophic_token_fraction": bad.to(log_r.dtype),
                   "mis_rs_catastrophic_seq_fraction": seq.to(log_r.dtype)}
    return (~seq).to(mask.dtype), metrics


def batch_normalized(weights: Tensor, mask: Tensor, level: TISLevel) -> tuple[Tensor, Tensor]:
    """(weights / mean, mean): the weights rescaled to mean 1 over the batch given (detached).

    token level: mean = Σ_{i,t} w·m / max(Σ m, 1); sequence level: the mean over samples of each sample's token
    mean of w (one weight per sample; a sample with no loss token counts as 0). A mean ≤ 1e-8 leaves the weights
    as they are (and reports 1). slime defines no mean for the geometric level (its MIS function raises)."""
    with torch.no_grad():
        if level == "token":
            mean = masked_mean(weights, mask)
        elif level == "sequence":
            mean = masked_sample_mean_sum(weights, mask) / weights.shape[0]
        else:
            raise ValueError(f"--tis-batch-normalize needs --tis-level token or sequence, not {level!r}")
        if mean <= 1e-8:
            return weights, torch.ones((), dtype=weights.dtype)
        return weights / mean, mean


def mis_weights(
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    mask: Tensor,
    *,
    level: TISLevel = "token",
    mode: TISMode = "truncate",
    clip_low: float = 0.0,
    clip_high: float = 2.0,
    rs_level: TISLevel | None = None,
    rs_low: float = 0.0,
    rs_high: float = math.inf,
    veto_threshold: float | None = None,
    normalize: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(weights [B, T], keep mask [B, T], per-token metrics), detached: `importance_weights`, then rejection
    sampling at `rs_level` (None: off), the veto, and the normalisation of the weights (see the module docstring).

    In mask mode the weights that are normalised keep the ratio on the tokens the mode rejects (slime's MIS does;
    those tokens leave the numerators through the keep mask either way)."""
    w, keep, metrics = importance_weights(old_log_probs, rollout_log_probs, mask, level=level, mode=mode,
                                          clip_low=clip_low, clip_high=clip_high)
    if rs_level is not None:
        rs_keep, rs_metrics = rejection_keep(old_log_probs, rollout_log_probs, mask, level=rs_level, low=rs_low,
                                             high=rs_high)
        keep = keep * rs_keep
        metrics.update(rs_metrics)
    if veto_threshold is not None:
        v_keep, v_metrics = veto_keep(old_log_probs, rollout_log_probs, mask, veto_threshold)
        keep = keep * v_keep
        metrics.update(v_metrics)
    if normalize:
        base = metrics["tis"] * mask.to(w.dtype) if mode == "mask" else w
        w, mean = batch_normalized(base, mask, level)
        metrics["mis_batch_norm_factor"] = mean.expand_as(w)
    return w, keep, metrics


def opsm_keep(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor, delta: float
              ) -> tuple[Tensor, Tensor]:
    """(keep [B, T], dropped [B, T]), detached: OPSM drops token t of sample i where A_it < 0 and the sample's
    KL estimate mean_t (ℓold − ℓθ) over its loss tokens exceeds `delta` (--opsm-delta): a negative update on a
    sequence the current policy has already moved away from. `advantages` per token [B, T] or per sample [B]."""
    with torch.no_grad():
        seq_kl = -gspo_log_ratio(log_probs.detach(), old_log_probs.detach(), mask)
        adv = advantages.unsqueeze(-1) if advantages.dim() == log_probs.dim() - 1 else advantages
        drop = (adv < 0) & (seq_kl > delta)
    return (~drop).to(log_probs.dtype), drop.to(log_probs.dtype)
