"""Buffer filters: which queued groups a train step takes (slime's `--buffer-filter-path` contract).

Signature: `buffer_filter(args, rollout_id, buffer: list[list[Sample]], num_samples) -> list[list[Sample]]`.
A filter must *pop* the groups it returns from `buffer` (in place) and, when the buffer holds at least
`num_samples` groups, return exactly `num_samples` of them. `num_samples` counts groups, as in slime.
streamrl passes the train step as `rollout_id` (slime passes None).

Built-ins, selectable by name (`--buffer-filter-path NAME`):
  * `pop_first` / `fifo`: arrival order (slime's default). The only order under which admission pacing alone
    guarantees `--max-staleness` (see buffers/admission.py); the others rely on `--stale-policy` for the rest.
  * `lifo`: newest arrival first.
  * `freshest_first`: newest token version first; equal versions -> newest arrival first (so it is `lifo` when
    every group has the same version).
  * `oldest_version_first`: oldest token first (trains groups before they go stale); ties -> oldest arrival.
  * `prioritized`: samples without replacement with probability proportional to a priority (`--buffer-priority`):
      `reward_std` (default): std of the rewards in the group. GRPO gives a zero-std group zero advantage, so
          the informative groups go first;
      `abs_advantage`: mean |r - mean(r)| over the group (the GRPO advantage before std normalisation, which
          would make every non-degenerate group look alike);
      `recency`: 1 + newest token version - the oldest such version in the buffer.
    Every group gets at least 1% of the largest priority (all equal when all are 0), so none starves forever.
    Randomness comes from `(--seed, rollout_id, the queued group ids)` only: the same queue at the same step
    gives the same choice, in any process and after a save/load, and there is no RNG state to keep.

Every built-in is written once as an *order* over `GroupMeta`s (attribute `.order` of the filter function): the
buffer calls it on metadata directly, so encoded groups are never decoded just to be sorted. A user filter gets
real Samples. A filter object may define `state_dict()` / `load_state_dict(d)`: the buffer saves its state.
Groups with no generated tokens carry no version; they sort as the newest (nothing in them can be stale).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from streamrl.plugins import load_function
from streamrl.types import Group
from streamrl.wire import GroupMeta, meta_of

Order = Callable[[Any, Any, list[GroupMeta], int], list[int]]
PRIORITIES = ("reward_std", "abs_advantage", "recency")


def _pop(buffer: list[Group], idx: list[int]) -> list[Group]:
    """Pop `buffer[i] for i in idx` in that order, keeping the rest in their original order."""
    out = [buffer[i] for i in idx]
    chosen = set(idx)
    buffer[:] = [g for i, g in enumerate(buffer) if i not in chosen]
    return out


def _slime(order: Order, name: str, doc: str) -> Callable:
    """The slime-signature filter for an order: compute metas, order, pop."""

    def fn(args: Any, rollout_id: Any, buffer: list[Group], num_samples: int) -> list[Group]:
        return _pop(buffer, order(args, rollout_id, [meta_of(g) for g in buffer], num_samples))

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.order = order
    return fn


def _vmax(m: GroupMeta) -> float:
    return math.inf if m.vmax is None else m.vmax


def _vmin(m: GroupMeta) -> float:
    return math.inf if m.vmin is None else m.vmin


def _fifo(args: Any, rollout_id: Any, metas: list[GroupMeta], k: int) -> list[int]:
    return list(range(min(k, len(metas))))


def _lifo(args: Any, rollout_id: Any, metas: list[GroupMeta], k: int) -> list[int]:
    return list(range(len(metas) - 1, len(metas) - 1 - min(k, len(metas)), -1))


def _freshest(args: Any, rollout_id: Any, metas: list[GroupMeta], k: int) -> list[int]:
    return sorted(range(len(metas)), key=lambda i: (-_vmax(metas[i]), -i))[:k]


def _oldest(args: Any, rollout_id: Any, metas: list[GroupMeta], k: int) -> list[int]:
    return sorted(range(len(metas)), key=lambda i: (_vmin(metas[i]), i))[:k]


def _reward(r: Any, key: str | None) -> float:
    if isinstance(r, dict):
        if key is None:
            raise ValueError("reward is a dict: set --reward-key for the prioritized buffer filter")
        return float(r[key])
    return 0.0 if r is None else float(r)


def priority_scores(metas: list[GroupMeta], kind: str = "reward_std", reward_key: str | None = None) -> np.ndarray:
    """Raw scores (>= 0) of each group for `--buffer-priority kind` (before the 1% floor)."""
    if kind == "recency":
        v = np.array([m.vmax if m.vmax is not None else np.nan for m in metas], dtype=np.float64)
        if np.isnan(v).all():
            return np.ones(len(metas))
        lo = np.nanmin(v)
        return np.where(np.isnan(v), np.nanmax(v), v) - lo + 1.0
    if kind not in PRIORITIES:
        raise ValueError(f"unknown --buffer-priority {kind!r}; choices: {', '.join(PRIORITIES)}")
    out = np.zeros(len(metas))
    for i, m in enumerate(metas):
        r = np.array([_reward(x, reward_key) for x in m.rewards], dtype=np.float64)
        if r.size:
            out[i] = r.std() if kind == "reward_std" else np.abs(r - r.mean()).mean()
    return out


def _rng(args: Any, rollout_id: Any, metas: list[GroupMeta]) -> np.random.Generator:
    step = 0 if rollout_id is None else int(rollout_id) + 1
    content = zlib.crc32("\0".join(m.gid for m in metas).encode())
    return np.random.default_rng([int(args.seed or 0) & 0xFFFFFFFF, step, content])


def _prioritized(args: Any, rollout_id: Any, metas: list[GroupMeta], k: int) -> list[int]:
    k = min(k, len(metas))
    if k == 0:
        return []
    kind = args.buffer_priority or "reward_std"
    s = priority_scores(metas, kind, args.reward_key)
    top = s.max()
    p = s + 0.01 * top if top > 0 else np.ones_like(s)
    # Efraimidis-Spirakis: the k largest u^(1/p) are a weighted sample without replacement, in draw order.
    keys = np.log(_rng(args, rollout_id, metas).random(len(metas))) / p
    return [int(i) for i in np.argsort(-keys, kind="stable")[:k]]


pop_first = _slime(_fifo, "pop_first", "FIFO: the first `num_samples` groups (slime's default).")
fifo = pop_first
lifo = _slime(_lifo, "lifo", "LIFO: the last `num_samples` groups put, newest first.")
freshest_first = _slime(_freshest, "freshest_first", "Newest token version first; ties: newest arrival first.")
oldest_version_first = _slime(_oldest, "oldest_version_first", "Oldest token first (by min version); ties: FIFO.")
prioritized = _slime(_prioritized, "prioritized", "Weighted sampling by `--buffer-priority` (module docstring).")

BUILTIN_FILTERS: dict[str, Callable] = {
    "pop_first": pop_first,
    "fifo": fifo,
    "lifo": lifo,
    "freshest_first": freshest_first,
    "oldest_version_first": oldest_version_first,
    "prioritized": prioritized,
}


def load_buffer_filter(spec: str | None) -> Callable:
    """`--buffer-filter-path`: a built-in name, `module:function` or `file.py:function`; None means `pop_first`."""
    if spec is None:
        return pop_first
    return load_function(spec, BUILTIN_FILTERS, what="buffer filter")
