"""Off-policy correction between the behaviour policy µ (engine, possibly stale weights) and the proximal π_old.

Per response token, δ_t = ℓold_t − ℓroll_t (log π_old − log µ, both detached). `importance_weights` builds the
weight that multiplies each token's policy-gradient loss, at one of three levels:

    token      log w_t = δ_t                                   (TIS, Yao et al. 2025)
    sequence   log w_t = Σ_s δ_s·m_s          for every t      (product of the sample's token ratios)
    geometric  log w_t = Σ_s δ_s·m_s / Σ_s m_s                 (geometric mean of the token ratios)

and in one of two modes, with bounds [L, U] = [--tis-clip-low, --tis-clip]:

    truncate   w = clamp(ρ, L, U)                              (TIS: biased, bounded variance)
    mask       w = ρ·1[L ≤ ρ ≤ U], and the token leaves the loss mask  (IcePop = token level + mask mode; MIS)

with ρ = exp(log w) (log w clamped to ±20 so a sequence-level product cannot overflow). Masked tokens keep their
place in the loss denominators (see `reduce.py`). Metrics per token: `tis` = ρ, `tis_clipfrac` = 1 where w ≠ ρ,
`tis_abs` = |ρ − 1|. With no staleness and bit-identical engine/trainer numerics, δ = 0 and every w is exactly 1.

`--custom-tis-function-path` plug-ins use slime's calling convention on flat per-token tensors; `call_tis_function`
adapts between it and the trainer's padded [B, T] layout, and `vanilla_tis_function` / `icepop_function` are the
built-ins in that convention.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

TISLevel = Literal["token", "sequence", "geometric"]
TISMode = Literal["truncate", "mask"]
MAX_LOG_W = 20.0  # |log w| bound before exp: a sequence-level product of ratios cannot overflow


def level_log_ratio(delta: Tensor, m: Tensor, level: TISLevel) -> Tensor:
    """log w per token at `level` from δ·m [B, T] (module docstring); every token of a sample shares the sequence
    and geometric values."""
    if level == "token":
        return delta
    if level not in ("sequence", "geometric"):
        raise ValueError(f"unknown TIS level {level!r}: expected token, sequence or geometric")
    s = delta.sum(-1, keepdim=True)
    if level == "geometric":
        s = s / m.sum(-1, keepdim=True).clamp(min=1.0)
    return s.expand_as(delta)


def importance_weights(
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    mask: Tensor,
    *,
    level: TISLevel = "token",
    mode: TISMode = "truncate",
    clip_low: float = 0.0,
    clip_high: float = 2.0,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(weights w [B, T], new loss mask [B, T], per-token metrics), all detached. See the module docstring."""
    with torch.no_grad():
        m = mask.to(old_log_probs.dtype)
        log_w = level_log_ratio((old_log_probs.detach() - rollout_log_probs.detach()) * m, m, level)
        ratio = torch.exp(log_w.clamp(-MAX_LOG_W, MAX_LOG_W))
        if mode == "truncate":
            w, new_mask = ratio.clamp(min=clip_low, max=clip_high), mask
        elif mode == "mask":
            keep = (ratio >= clip_low) & (ratio <= clip_high)
            w, new_mask = ratio * keep, mask * keep.to(mask.dtype)
        else:
            raise ValueError(f"unknown TIS mode {mode!r}: expected truncate or mask")
        metrics = {"tis": ratio, "tis_clipfrac": (w != ratio).to(ratio.dtype), "tis_abs": (ratio - 1).abs()}
    return w * m, new_mask, metrics


# ------------------------------------------------------------------ slime's plug-in convention


def vanilla_tis_function(args: Any, *, pg_loss: Tensor, train_log_probs: list[Tensor],
                         rollout_log_probs: list[Tensor], loss_masks: list[Tensor], **kwargs: Any
                         ) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """slime's default TIS in the plug-in convention: w = clamp(exp(ℓold − ℓroll), tis_clip_low, tis_clip)."""
    ratio = torch.exp(torch.cat(train_log_probs) - torch.cat(rollout_log_probs))
    w = ratio.clamp(min=args.tis_clip_low, max=args.tis_clip)
    metrics = {"tis": ratio, "tis_clipfrac": (w != ratio).float(), "tis_abs": (ratio - 1).abs()}
    return pg_loss * w, loss_masks, metrics


def icepop_function(args: Any, *, pg_loss: Tensor, train_log_probs: list[Tensor],
                    rollout_log_probs: list[Tensor], loss_masks: list[Tensor], **kwargs: Any
                    ) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """slime's IcePop: w = ρ where tis_clip_low ≤ ρ ≤ tis_clip, else 0 (masks unchanged, as in slime)."""
    ratio = torch.exp(torch.cat(train_log_probs) - torch.cat(rollout_log_probs))
    w = torch.where((ratio >= args.tis_clip_low) & (ratio <= args.tis_clip), ratio, torch.zeros_like(ratio))
    metrics = {"tis": ratio, "tis_clipfrac": (w != ratio).float(), "tis_abs": (ratio - 1).abs()}
    return pg_loss * w, loss_masks, metrics


BUILTIN_TIS_FUNCTIONS: dict[str, Callable[..., Any]] = {"vanilla": vanilla_tis_function, "icepop": icepop_function}

TISFunction = Callable[..., tuple[Tensor, list[Tensor], dict[str, Tensor]]]


def to_flat(padded: Tensor, response_lengths: list[int]) -> Tensor:
    """[B, T] right-padded -> [Σ r_i] (the samples' response tokens, concatenated)."""
    return torch.cat([padded[i, :r] for i, r in enumerate(response_lengths)])


def to_list(padded: Tensor, response_lengths: list[int]) -> list[Tensor]:
    """[B, T] right-padded -> per-sample [r_i] tensors."""
    return [padded[i, :r] for i, r in enumerate(response_lengths)]


def to_padded(flat: Tensor, response_lengths: list[int], like: Tensor) -> Tensor:
    """Inverse of `to_flat`: [Σ r_i] -> zeros_like(like) filled with each sample's tokens."""
    out = torch.zeros_like(like, dtype=flat.dtype)
    offset = 0
    for i, r in enumerate(response_lengths):
        out[i, :r] = flat[offset : offset + r]
        offset += r
    return out


def call_tis_function(
    fn: TISFunction,
    args: argparse.Namespace,
    pg: Tensor,
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    mask: Tensor,
    prompt_lengths: list[int],
    response_lengths: list[int],
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Run a slime-convention TIS function on padded tensors; returns (pg [B, T], new mask [B, T], metrics [B, T]).

    The function receives `pg_loss` flat [Σ r_i] (with grad), `train_log_probs` (ℓold), `rollout_log_probs` and
    `loss_masks` as per-sample lists, `total_lengths` and `response_lengths`; it returns the re-weighted flat
    pg_loss, per-sample loss masks (tokens it rejects set to 0) and flat per-token metrics.
    """
    new_pg, new_masks, metrics = fn(
        args,
        pg_loss=to_flat(pg, response_lengths),
        train_log_probs=to_list(old_log_probs.detach(), response_lengths),
        rollout_log_probs=to_list(rollout_log_probs.detach(), response_lengths),
        loss_masks=to_list(mask, response_lengths),
        total_lengths=[p + r for p, r in zip(prompt_lengths, response_lengths, strict=True)],
        response_lengths=list(response_lengths),
    )
    new_mask = to_padded(torch.cat([torch.as_tensor(x, dtype=mask.dtype) for x in new_masks]), response_lengths,
                         mask) if new_masks else mask
    flat_metrics = {k: to_padded(v.detach().to(pg.dtype), response_lengths, pg) for k, v in metrics.items()}
    return to_padded(new_pg, response_lengths, pg), new_mask, flat_metrics
