"""Group filters run by the producers after scoring (slime's `--dynamic-sampling-filter-path`,
`--rollout-sample-filter-path`).

    --dynamic-sampling-filter-path fn(args, samples, **kw) -> DynamicFilterOutput | bool
        a dropped group never reaches the buffer; the ledger records it `filtered` with the reason, and its
        admission slot is given back so the producers admit another prompt at once (continuous over-sampling).
    --rollout-sample-filter-path fn(args, groups) -> None
        sets `sample.remove_sample = True` on samples to leave out of the loss (the group is still trained).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamrl.plugins import load_function
from streamrl.types import Sample, Status


@dataclass
class DynamicFilterOutput:
    """slime's `slime.rollout.filter_hub.base_types.DynamicFilterOutput`."""

    keep: bool
    reason: str | None = None
    keep_when_insufficient: bool = False


def check_reward_nonzero_std(args: argparse.Namespace, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """DAPO: drop a group whose rewards are all equal (no learning signal for GRPO); reason `zero_std_<reward>`.
    Samples whose reward failed are left out (they leave the group's baseline too); fewer than two scored samples
    give no signal either."""
    rewards = [s.get_reward_value(args.reward_key) for s in samples if s.status != Status.FAILED]
    if len(rewards) < 2:
        return DynamicFilterOutput(keep=False, reason="fewer_than_2_scored")
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    if std > 1e-6:
        return DynamicFilterOutput(keep=True)
    return DynamicFilterOutput(keep=False, reason=f"zero_std_{round(rewards[0], 1)}")


BUILTIN_DYNAMIC_FILTERS: dict[str, Callable] = {"check_reward_nonzero_std": check_reward_nonzero_std}


def load_dynamic_filter(spec: str | None) -> Callable | None:
    if not spec:
        return None

    # slime's own path for the built-in keeps working
    spec = spec.replace("slime.rollout.filter_hub.dynamic_sampling_filters.", "")
    return load_function(spec, BUILTIN_DYNAMIC_FILTERS, what="--dynamic-sampling-filter-path")


def load_sample_filter(spec: str | None) -> Callable | None:
    if not spec:
        return None

    return load_function(spec, what="--rollout-sample-filter-path")


async def call_dynamic_filter(fn: Callable, args: argparse.Namespace, group: list[Sample]) -> tuple[bool, str | None]:
    """(keep, reason) from a filter returning DynamicFilterOutput (or any object with `.keep`) or a bool."""
    out = fn(args, group)
    if inspect.isawaitable(out):
        out = await out
    if isinstance(out, bool):
        return out, None if out else "dynamic_filter"
    keep = bool(getattr(out, "keep", True))
    return keep, None if keep else (getattr(out, "reason", None) or "dynamic_filter")
