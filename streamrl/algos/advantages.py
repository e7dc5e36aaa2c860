"""Advantage estimators (slime `--advantage-estimator`), pure tensor math.

Two stages, as in slime:

* per sample, on the driver (needs whole groups): `grpo_advantages` turns the scalar rewards r_i into r̃_i
  (group mean subtracted, optionally divided by the group std). grpo / gspo / cispo broadcast r̃_i to every token;
  reinforce_plus_plus_baseline subtracts the group mean only; reinforce_plus_plus and ppo use the raw r_i.
* per token, in the trainer (needs log-probs, reference log-probs, values): `kl_shaped_rewards`,
  `discounted_returns` (REINFORCE++), `gae` (PPO), `reinforce_pp_baseline`, `opd_advantages`, `masked_whiten`.

Conventions: per-token tensors are [B, T], right-padded; `resp_mask` is 1 on the r_i real response tokens of
sample i, `mask` the loss mask (resp_mask with tool / removed tokens zeroed). Padded positions (t ≥ r_i) hold 0 in
every result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over data-parallel ranks (identity for one process)


def grpo_advantages(
    rewards: Tensor, n: int, std_normalize: bool = True, normalize: bool = True, eps: float = 1e-6,
    valid: Tensor | None = None,
) -> Tensor:
    """GRPO group-normalised rewards, one per sample.

    `rewards` is [G·n], group-contiguous (samples g·n .. g·n+n−1 are the n samples of prompt g). For sample i of
    group g:  Â_i = (r_i − mean_g(r)) / (std_g(r) + eps), with std the unbiased (n−1) torch.std as in slime.
    `std_normalize=False` (--disable-grpo-std-normalization) or n == 1 keeps only the mean subtraction;
    `normalize=False` (--disable-rewards-normalization) returns the raw rewards. A group whose rewards are all equal
    gets zeros. The result is float32 (or the input's floating dtype) and has the input's shape.

    `valid` ([G·n] bool): only the valid samples of a group enter its mean and std (over its k valid samples, std
    with k−1), and the others get 0. A sample whose reward failed is left out so, not the whole group; a group with
    one valid sample gets zeros (no baseline to compare it with).
    """
    if n < 1 or rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of n={n}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    if not normalize:
        return r.clone()
    groups = r.reshape(-1, n)
    if valid is not None:
        v = valid.reshape(-1, n).to(r.dtype)
        k = v.sum(dim=1, keepdim=True)
        adv = (groups - (groups * v).sum(dim=1, keepdim=True) / k.clamp(min=1)) * v
        if std_normalize and n > 1:
            adv = adv / (((adv**2).sum(dim=1, keepdim=True) / (k - 1).clamp(min=1)).sqrt() + eps)
        return adv.reshape(rewards.shape)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize and n > 1:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


def expand_to_tokens(per_sample: Tensor, mask: Tensor) -> Tensor:
    """A[b, t] = Â_b · m[b, t]: broadcast one value per sample to its response tokens ([B] × [B, T] -> [B, T])."""
    a = per_sample if per_sample.is_floating_point() else per_sample.to(torch.float32)
    return a.unsqueeze(-1) * mask.to(a.dtype)


def last_token_onehot(mask: Tensor) -> Tensor:
    """e[b, t] = 1 at the last t with mask[b, t] = 1 (all zeros for a fully masked sample). [B, T] -> [B, T]."""
    m = mask.to(torch.float32) > 0
    t = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    last = torch.where(m, t, torch.full_like(t, -1)).max(dim=-1, keepdim=True).values
    return (t == last).to(torch.float32) * m


def kl_shaped_rewards(rewards: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0,
                      resp_mask: Tensor | None = None) -> Tensor:
    """Token rewards ρ[b, t] = −β·KL[b, t]·r_mask[b, t] + r_b·1[t = last unmasked token of b]  (β = --kl-coef).

    The outcome reward sits on the sample's last trainable token (slime's REINFORCE++; slime's PPO puts it on the
    last response token, which is the same token unless the response ends with tool output). The KL penalty falls
    on every response token (`resp_mask`, tool output included, as slime's returns do; default: `mask`). `kl` is the
    per-token estimate of KL(π_old ‖ π_ref) (`kl_estimate(ℓold, ℓref, --kl-loss-type)`); None or β = 0: no shaping.
    """
    m = mask.to(torch.float32)
    rho = rewards.to(torch.float32).unsqueeze(-1) * last_token_onehot(m)
    if kl is not None and kl_coef:
        penalised = m if resp_mask is None else resp_mask.to(torch.float32)
        rho = rho - kl_coef * kl.to(torch.float32) * penalised
    return rho


def discounted_returns(token_rewards: Tensor, resp_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ returns G[b, t] = Σ_{k ≥ t} γ^{k−t} ρ[b, k], over the response (zero past its end)."""
    rho = token_rewards * resp_mask.to(token_rewards.dtype)
    out = torch.zeros_like(rho)
    running = torch.zeros_like(rho[:, 0])
    for t in range(rho.shape[1] - 1, -1, -1):
        running = rho[:, t] + gamma * running
        out[:, t] = running
    return out * resp_mask.to(rho.dtype)


def gae(token_rewards: Tensor, values: Tensor, resp_mask: Tensor, gamma: float = 1.0, lambd: float = 1.0
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (PPO), per response token; returns (advantages, returns).

        δ_t = ρ_t + γ·V_{t+1} − V_t   (V_{r_i} = 0: the episode ends after the last response token)
        A_t = δ_t + γλ·A_{t+1}        (A_{r_i} = 0),          R_t = A_t + V_t   (the critic's regression target)

    V_t is the critic's value of the state before response token t (the position whose logits predict it).
    Tool tokens inside a response are ordinary time steps of the recursion (as in slime); only the loss masks them.
    """
    m = resp_mask.to(torch.float32)
    rho, v = token_rewards.to(torch.float32) * m, values.to(torch.float32) * m
    adv = torch.zeros_like(rho)
    next_v = torch.zeros_like(rho[:, 0])
    running = torch.zeros_like(rho[:, 0])
    for t in range(rho.shape[1] - 1, -1, -1):
        delta = rho[:, t] + gamma * next_v - v[:, t]
        running = (delta + gamma * lambd * running) * m[:, t]
        adv[:, t] = running
        next_v = v[:, t]
    return adv, (adv + v) * m


def reinforce_pp_baseline(baselined_rewards: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
                          ) -> Tensor:
    """REINFORCE++-baseline: A[b, t] = (r_b − mean_group(r)) − β·KL[b, t], on the loss-masked tokens.

    `baselined_rewards` is `grpo_advantages(r, n, std_normalize=False)` (computed on the driver, whole groups).
    """
    a = expand_to_tokens(baselined_rewards.to(torch.float32), mask)
    if kl is not None and kl_coef:
        a = a - kl_coef * kl.to(torch.float32) * mask.to(torch.float32)
    return a


def opd_advantages(advantages: Tensor, student_log_probs: Tensor, teacher_log_probs: Tensor, coef: float,
                   mask: Tensor) -> Tensor:
    """On-policy distillation (--use-opd): A_t ← A_t − c·(ℓstudent_t − ℓteacher_t), c = --opd-kl-coef.

    ℓstudent is the proximal log-prob ℓold (detached), so the term is a per-token reverse-KL reward that pulls the
    student towards the teacher on the student's own samples. With A = 0 and c = 1 it is the pure distillation
    advantage ℓteacher − ℓstudent (`--advantage-estimator on_policy_distillation`).
    """
    delta = (student_log_probs - teacher_log_probs).detach().to(torch.float32)
    return (advantages - coef * delta) * mask.to(torch.float32)


def masked_whiten(values: Tensor, mask: Tensor, all_reduce: AllReduce | None = None, eps: float = 1e-8,
                  shift_mean: bool = True) -> Tensor:
    """--normalize-advantages: (v − μ)·(σ² + eps)^−½ on masked tokens (0 elsewhere), μ, σ² over ALL ranks.

    μ = S1/N, σ² = (S2/N − μ²)·N/(N−1) (Bessel, for N ≥ 2) with S1 = Σ v·m, S2 = Σ v²·m, N = Σ m summed over ranks by
    `all_reduce` (slime's `distributed_masked_whiten`). `shift_mean=False` keeps the mean: v·(σ² + eps)^−½.
    Raises ValueError when no rank has a masked token.
    """
    m = mask.to(torch.float64)
    v = values.to(torch.float64)
    stats = torch.stack([(v * m).sum(), (v * v * m).sum(), m.sum()])
    if all_reduce is not None:
        stats = all_reduce(stats)
    s1, s2, n = stats.tolist()
    if n == 0:
        raise ValueError("masked_whiten: no unmasked token on any rank")
    mean = s1 / n
    var = s2 / n - mean * mean
    if n >= 2:
        var = var * n / (n - 1)
    centred = v - mean if shift_mean else v
    return (centred / (max(var, 0.0) + eps) ** 0.5 * m).to(values.dtype)
