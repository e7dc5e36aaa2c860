"""The learning-rate schedule, with Megatron's flags and maths (slime trains with Megatron's scheduler).

For the optimizer step taken after `n` earlier steps:
    warm-up (n <= W, W = --lr-warmup-iters > 0):  lr = init + (lr_max − init) · n / W   (init = --lr-warmup-init)
    then, with D = --lr-decay-iters (default: the job's train steps):
        n > D:   --min-lr
        else r = (n − W) / (D − W) and lr = min_lr + c(r) · (lr_max − min_lr), c = 1 (constant), 1 − r (linear),
        (1 + cos(π r)) / 2 (cosine).
"""

from __future__ import annotations

import math


def lr_at(n: int, *, lr: float, style: str = "constant", warmup: int = 0, warmup_init: float = 0.0,
          decay_iters: int | None = None, min_lr: float = 0.0) -> float:
    """Learning rate of the optimizer step that follows `n` earlier steps (module docstring)."""
    if warmup > 0 and n <= warmup:
        return warmup_init + (lr - warmup_init) * n / warmup
    if style == "constant":
        return lr
    if decay_iters is None:
        raise ValueError(f"--lr-decay-style {style} needs the number of decay steps (--lr-decay-iters)")
    if n > decay_iters:
        return min_lr
    span = max(decay_iters - warmup, 1)
    r = min(max((n - warmup) / span, 0.0), 1.0)
    if style == "linear":
        coeff = 1.0 - r
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * r) + 1.0)
    else:
        raise ValueError(f"unknown --lr-decay-style {style!r}")
    return min_lr + coeff * (lr - min_lr)
