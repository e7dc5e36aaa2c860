"""slime's `--only-train-params-name-list` / `--freeze-params-name-list`: regular expressions searched in parameter
names (the backend's own: HF names under FSDP, Megatron names under Megatron, as slime matches its backend's).
Only-train first freezes everything and thaws what matches; freeze freezes what matches. A pattern that matches no
parameter is an error (a typo would otherwise train everything, or nothing)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch


def freeze_params(named: Iterable[tuple[str, torch.nn.Parameter]], only_train: list[str] | None,
                  freeze: list[str] | None) -> list[str]:
    """Set requires_grad by the patterns; returns the names left frozen (none when neither list is given)."""
    named = list(named)
    for flag, patterns in (("--only-train-params-name-list", only_train), ("--freeze-params-name-list", freeze)):
        for pat in patterns or []:
            if not any(re.search(pat, n) for n, _ in named):
                raise ValueError(f"{flag}: {pat!r} matches no parameter (names look like {named[0][0]!r})")
    if only_train:
        for name, p in named:
            p.requires_grad_(any(re.search(pat, name) for pat in only_train))
    for name, p in named:
        if freeze and any(re.search(pat, name) for pat in freeze):
            p.requires_grad_(False)
    return [n for n, p in named if not p.requires_grad] if (only_train or freeze) else []
