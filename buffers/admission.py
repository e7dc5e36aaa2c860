"""Admission pacing: how many groups producers may have taken from the data source at policy version `v`.

Let `B` be the groups one train step consumes, `N` the update interval (a publish every N steps) and `K` the
largest allowed staleness. Producers may admit group number `a` (0-based, counting every group ever admitted)
only while

    a < (v + K + 1) * N * B.

Why this bounds staleness under FIFO consumption: group `a` is admitted at a version `v_a` with
`a < (v_a + K + 1) N B`, i.e. `v_a >= a // (N B) - K`, and every token of it is generated at a version >= `v_a`.
FIFO hands it to train step `a // B`, which runs with trainer version `a // B // N = a // (N B)`. So its
staleness `a // (N B) - min(token_versions) <= a // (N B) - v_a <= K`. Pacing, not dropping, keeps the bound:
no generated work is thrown away unless a non-FIFO filter or a slow engine reorders groups (then
`--stale-policy` applies in the buffer).
"""

from __future__ import annotations

from typing import Any


def admission_limit(version: int, max_staleness: int, update_interval: int, groups_per_step: int) -> int:
    """Total groups that may have been admitted by policy version `version`: `(v + K + 1) * N * B`."""
    if version < 0 or max_staleness < 0:
        raise ValueError(f"version ({version}) and max_staleness ({max_staleness}) must be >= 0")
    if update_interval < 1 or groups_per_step < 1:
        raise ValueError(f"update_interval ({update_interval}) and groups_per_step ({groups_per_step}) must be >= 1")
    return (version + max_staleness + 1) * update_interval * groups_per_step


def may_admit(admitted: int, version: int, max_staleness: int, update_interval: int, groups_per_step: int) -> bool:
    """Whether one more group may be admitted when `admitted` groups were admitted so far (`a < limit`)."""
    return admitted < admission_limit(version, max_staleness, update_interval, groups_per_step)


def groups_per_step(args: Any) -> int:
    """`B`: groups consumed by one train step, from `--global-batch-size` (samples) / `--n-samples-per-prompt`.

    Without `--global-batch-size`, a step takes `rollout_batch_size * n_samples_per_prompt / num_steps_per_rollout`
    samples (slime's default).
    """
    n = int(args.n_samples_per_prompt)
    gbs = getattr(args, "global_batch_size", None)
    if gbs is None:
        gbs = args.rollout_batch_size * n // max(1, int(getattr(args, "num_steps_per_rollout", 1)))
    if gbs < n or gbs % n:
        raise ValueError(f"global batch size {gbs} samples is not a positive multiple of n_samples_per_prompt={n}")
    return gbs // n
