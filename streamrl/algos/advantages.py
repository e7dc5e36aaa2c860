"""Advantage estimators (slime `--advantage-estimator`; only GRPO so far)."""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_advantages(
    rewards: Tensor, n: int, std_normalize: bool = True, normalize: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO group-normalised rewards, one per sample.

    `rewards` is [G·n], group-contiguous (samples g·n .. g·n+n−1 are the n samples of prompt g). For sample i of
    group g:  Â_i = (r_i − mean_g(r)) / (std_g(r) + eps), with std the unbiased (n−1) torch.std as in slime.
    `std_normalize=False` (--disable-grpo-std-normalization) or n == 1 keeps only the mean subtraction;
    `normalize=False` (--disable-rewards-normalization) returns the raw rewards. A group whose rewards are all equal
    gets zeros. The result is float32 (or the input's floating dtype) and has the input's shape.
    """
    if n < 1 or rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of n={n}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    if not normalize:
        return r.clone()
    groups = r.reshape(-1, n)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize and n > 1:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


def expand_to_tokens(per_sample: Tensor, mask: Tensor) -> Tensor:
    """A[b, t] = Â_b · m[b, t]: broadcast one value per sample to its response tokens ([B] × [B, T] -> [B, T])."""
    a = per_sample if per_sample.is_floating_point() else per_sample.to(torch.float32)
    return a.unsqueeze(-1) * mask.to(a.dtype)
