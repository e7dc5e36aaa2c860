"""Off-policy corrections for bounded staleness, one function each, with the formula and where it comes from.

Per response token t: ℓθ current log-prob (with grad), ℓprox proximal log-prob (the trainer's weights at the start
of the train step, recomputed once for the whole batch), ℓµ behaviour log-prob recorded by the engine (`rollout_
log_probs`, possibly several versions old), A advantage, m loss mask. sg = stop-gradient. All ratio maths in fp32
from log-probs, log-ratios clamped to ±20 before exp.

    token TIS             L = w·max(−ρA, −clip(ρ, 1−ε, 1+ε_h)A),  ρ = e^{ℓθ−ℓprox},  w = clamp(e^{ℓprox−ℓµ}, L, U)
                          slime `vanilla_tis_function` (--use-tis), `offpolicy.importance_weights`
    behaviour-anchored    L = max(−ρA, −clip(ρ)A) with ρ = e^{ℓθ−ℓµ}: the clip is anchored at µ (slime/verl
                          "bypass": --use-rollout-logprobs); `behaviour_anchored_loss`
    decoupled PPO         the TIS line above, with SEVERAL optimizer steps per batch (--num-mini-batches) and ℓprox
                          fixed from the first forward, so that ρ ≠ 1 from the second mini-batch on and the clip is
                          a trust region around π_prox; AReaL `ppo_actor_loss_fn` (Hilton et al. 2022);
                          `decoupled_ppo_loss`
    M2 trust region       drop the tokens with the largest (ℓprox − ℓµ)² until the mean over the kept tokens is
                          below τ (M2PO, arXiv 2510.01161; the rule of AReaL's port `_get_m2po_loss_mask`);
                          `m2_keep_mask`
    sequence / geometric  w from Σ_t or mean_t of ℓprox − ℓµ (slime's MIS example, verl `rollout_is=sequence`,
                          geo-RS); `offpolicy.importance_weights(level=...)`

    staleness decay       every token of a sample s versions stale weighted by γ^s (--staleness-decay; a heuristic
                          the data suggested trying); `staleness_weights`

`mismatch_by_staleness` measures, per staleness bucket, how far π_prox has moved from µ (ratio, KL(µ‖π_prox)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from streamrl.algos.losses import ppo_clip_loss
from streamrl.algos.offpolicy import TISLevel, TISMode, importance_weights

_MAX_LOG = 20.0


def _identity(t: Tensor) -> Tensor:
    return t


def behaviour_anchored_loss(log_probs: Tensor, rollout_log_probs: Tensor, advantages: Tensor, eps_clip: float = 0.2,
                            eps_clip_high: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO clip anchored at µ: L = max(−ρA, −clip(ρ, 1−ε, 1+ε_h)A), ρ = e^{ℓθ − ℓµ}; (loss, clipfrac) per token.

    slime `--use-rollout-logprobs` / verl bypass mode: no extra importance weight (it would count µ twice). A token
    whose probability already rose since µ sampled it is clipped at once (A > 0, ρ > 1 + ε): a trust region around
    the behaviour policy, which at high staleness also removes informative tokens.
    """
    return ppo_clip_loss(log_probs, rollout_log_probs.detach(), advantages, eps_clip, eps_clip_high)


def decoupled_ppo_loss(
    log_probs: Tensor,
    prox_log_probs: Tensor,
    rollout_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    level: TISLevel = "token",
    mode: TISMode = "truncate",
    clip_low: float = 0.0,
    clip_high: float = 2.0,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Decoupled PPO (AReaL `ppo_actor_loss_fn`): (per-token loss, loss mask after rejection, per-token metrics).

        ρ = e^{ℓθ − sg(ℓprox)},   L_clip = max(−ρA, −clip(ρ, 1−ε, 1+ε_h)A)
        w = f(e^{sg(ℓprox) − sg(ℓµ)})   (f: truncate to [clip_low, clip_high], or mask outside it)
        L = w·L_clip

    The trainer's policy loss with --use-tis is exactly this (`streamrl/train/objective.py`); it becomes a trust region
    only when π_θ moves away from π_prox within the batch, i.e. with --num-mini-batches > 1. AReaL applies w
    untruncated with rejection (mask where w > 5); slime and verl truncate at 2. Masked tokens keep their place in
    the denominator (the caller's reducer).
    """
    loss, clipfrac = ppo_clip_loss(log_probs, prox_log_probs.detach(), advantages, eps_clip, eps_clip_high)
    w, keep, metrics = importance_weights(prox_log_probs, rollout_log_probs, mask, level=level, mode=mode,
                                          clip_low=clip_low, clip_high=clip_high)
    return w * loss, keep, {**metrics, "pg_clipfrac": clipfrac}


def m2_keep_mask(prox_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, threshold: float,
                 all_reduce: Callable[[Tensor], Tensor] = _identity, iters: int = 64) -> Tensor:
    """M2 trust region: 1 on the tokens kept, 0 on those dropped (and off the mask). Detached.

    M2 = mean over tokens of δ², δ = ℓprox − ℓµ. Drop the tokens with the largest δ² until the M2 of the rest is
    below `threshold` τ: keep {δ² ≤ c}, with c the largest value for which mean{δ² ≤ c} < τ (that mean grows with c,
    so the rule is the same as dropping from the top). M2PO's paper measures π_θ against µ with τ = 0.04; AReaL's
    port, followed here, measures π_prox against µ over all valid tokens (π_prox is known before the step, so the
    mask is fixed for every mini-batch). Where even the smallest δ² exceeds τ nothing is kept (AReaL keeps one).

    Over ranks and micro-batches: `mask` and the log-probs may be one rank's slice; c is found by bisection on the
    all-reduced (count, sum) of {δ² ≤ c}, so every rank keeps exactly what one process would keep.
    """
    with torch.no_grad():
        m = mask > 0
        d2 = (prox_log_probs.detach().double() - rollout_log_probs.detach().double()).clamp(-_MAX_LOG, _MAX_LOG)
        d2 = torch.where(m, d2.square(), torch.zeros_like(d2))

        def stats(c: float) -> tuple[float, float]:
            sel = m & (d2 <= c)
            s = all_reduce(torch.stack([sel.sum().double(), (d2 * sel).sum()]).reshape(2))
            return float(s[0]), float(s[1])

        n, total = stats(float("inf"))
        if n == 0 or total / n < threshold:
            return mask.clone()
        lo, hi = 0.0, total  # mean{δ² ≤ total} ≥ τ (that is everything); the empty set counts as within budget
        for _ in range(iters):
            mid = (lo + hi) / 2
            k, s = stats(mid)
            if k == 0 or s / k < threshold:
                lo = mid
            else:
                hi = mid
        return (m & (d2 <= lo)).to(mask.dtype)


def staleness_weights(staleness: Tensor, decay: float) -> Tensor:
    """Per-sample loss weight γ^s for a sample s versions stale (--staleness-decay γ ≤ 1): stale groups count less,
    the step's denominators do not change (so it also shrinks the step). A heuristic, no source."""
    return torch.pow(torch.tensor(float(decay), dtype=torch.float64), staleness.double()).float()


def kl_behaviour_prox(prox_log_probs: Tensor, rollout_log_probs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(µ ‖ π_prox) from tokens sampled by µ: r − 1 − log r, r = π_prox/µ (≥ 0)."""
    log_r = (prox_log_probs.detach() - rollout_log_probs.detach()).clamp(-_MAX_LOG, _MAX_LOG)
    return torch.exp(log_r) - 1 - log_r


def mismatch_by_staleness(per_token: dict[str, Tensor], mask: Tensor, staleness: Tensor, max_bucket: int
                          ) -> dict[str, Tensor]:
    """Sums for per-staleness-bucket means: {"mismatch_sum/s{k}/{name}": Σ_{i: s_i = k} token-mean_i(value),
    "mismatch_sum/s{k}/n": #samples with s_i = k}, k = 0..max_bucket (larger staleness counts in the last bucket).

    Sums over micro-batches and ranks, then divide by n (`bucket_means`): the sample mean of token means in each
    bucket, the same reduction as the step's other metrics.
    """
    m = mask.to(torch.float64)
    denom = m.sum(-1).clamp(min=1.0)
    s = staleness.clamp(max=max_bucket)
    out: dict[str, Tensor] = {}
    for k in range(max_bucket + 1):
        sel = (s == k).to(torch.float64)
        out[f"mismatch_sum/s{k}/n"] = sel.sum()
        for name, v in per_token.items():
            out[f"mismatch_sum/s{k}/{name}"] = (((v.detach().double() * m).sum(-1) / denom) * sel).sum()
    return out


def bucket_means(sums: dict[str, float]) -> dict[str, float]:
    """{"mismatch/s{k}/{name}": sum / n} from the all-reduced `mismatch_by_staleness` sums (empty buckets left out);
    other keys pass through."""
    out = {k: v for k, v in sums.items() if not k.startswith("mismatch_sum/")}
    for k, v in sums.items():
        if k.startswith("mismatch_sum/") and not k.endswith("/n"):
            bucket = k.split("/")[1]
            n = sums.get(f"mismatch_sum/{bucket}/n", 0.0)
            if n > 0:
                out["mismatch/" + k[len("mismatch_sum/"):]] = v / n
    return out
