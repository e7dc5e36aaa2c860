"""Buffer filters: which queued groups a train step takes (slime's `--buffer-filter-path` contract).

Signature: `buffer_filter(args, rollout_id, buffer: list[list[Sample]], num_samples) -> list[list[Sample]]`.
A filter must *pop* the groups it returns from `buffer` (in place) and, when the buffer holds at least
`num_samples` groups, return exactly `num_samples` of them. `num_samples` counts groups, as in slime.
streamrl passes the train step as `rollout_id` (slime passes None).

Groups with no generated tokens carry no version; they sort as the newest (nothing in them can be stale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from streamrl.plugins import load_function
from streamrl.types import Group, group_versions


def _pop(buffer: list[Group], idx: list[int]) -> list[Group]:
    """Pop `buffer[i] for i in idx` in that order, keeping the rest in their original order."""
    out = [buffer[i] for i in idx]
    chosen = set(idx)
    buffer[:] = [g for i, g in enumerate(buffer) if i not in chosen]
    return out


def _version(group: Group, which: int) -> float:
    v = group_versions(group)
    return math.inf if v is None else v[which]


def pop_first(args: Any, rollout_id: Any, buffer: list[Group], num_samples: int) -> list[Group]:
    """FIFO: the first `num_samples` groups (slime's default). Keeps admission pacing's staleness bound."""
    out = buffer[:num_samples]
    del buffer[:num_samples]
    return out


def freshest_first(args: Any, rollout_id: Any, buffer: list[Group], num_samples: int) -> list[Group]:
    """Newest groups first, by their newest token version; ties keep FIFO order (stable sort)."""
    order = sorted(range(len(buffer)), key=lambda i: -_version(buffer[i], 1))
    return _pop(buffer, order[:num_samples])


def oldest_version_first(args: Any, rollout_id: Any, buffer: list[Group], num_samples: int) -> list[Group]:
    """Groups with the oldest token first (by min token version): trains them before they go stale."""
    order = sorted(range(len(buffer)), key=lambda i: _version(buffer[i], 0))
    return _pop(buffer, order[:num_samples])


BUILTIN_FILTERS: dict[str, Callable] = {
    "pop_first": pop_first,
    "freshest_first": freshest_first,
    "oldest_version_first": oldest_version_first,
}


def load_buffer_filter(spec: str | None) -> Callable:
    """`--buffer-filter-path`: a built-in name, `module:function` or `file.py:function`; None means `pop_first`."""
    if spec is None:
        return pop_first
    return load_function(spec, BUILTIN_FILTERS, what="buffer filter")
