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

One owner: the buffer's ledger. `a` is not a counter that producers keep: it is the number of groups that hold a
slot, trained + outstanding (in flight, partial, queued, regenerating), read from the ledger. A filtered, failed or
stale-dropped group leaves that set, so its slot comes back; a regenerated group stays in it, so it takes no second
slot. `Pacing` adds an origin (train step, version, groups trained) so that a resumed job, possibly with other
pacing flags, continues from where it is: group number `a'` since the origin is consumed at step `s0 + a' // B`,
whose version is `v0 + (s0 + a' // B) // N - s0 // N`; admitting it at version `v` keeps its staleness within `K`
iff `a' < ((v - v0 + K + 1 + s0 // N) * N - s0) * B` (the formula above when `s0 = v0 = 0`).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    gbs = args.global_batch_size
    if gbs is None:
        gbs = args.rollout_batch_size * n // max(1, int(args.num_steps_per_rollout))
    if gbs < n or gbs % n:
        raise ValueError(f"global batch size {gbs} samples is not a positive multiple of n_samples_per_prompt={n}")
    return gbs // n


@dataclass(frozen=True)
class Pacing:
    """The admission bound relative to an origin (see the module docstring): `limit(v)` groups may hold a slot
    since the origin, counting the ones trained since then."""

    max_staleness: int
    update_interval: int
    groups_per_step: int
    origin_step: int = 0  # train steps done at the origin (0, or the checkpoint's step on resume)
    origin_version: int = 0  # the weight version published at the origin
    origin_trained: int = 0  # groups trained before the origin (they hold no slot of the resumed job)

    def limit(self, version: int) -> int:
        k, n, b, s0 = self.max_staleness, self.update_interval, self.groups_per_step, self.origin_step
        v = max(version, self.origin_version) - self.origin_version
        return min(2**62, ((v + k + 1 + s0 // n) * n - s0) * b)  # K may be "unbounded" (2**31 - 1)

    def used(self, trained: int, outstanding: int) -> int:
        """Slots in use: groups trained since the origin plus the outstanding ones."""
        return trained - self.origin_trained + outstanding

    def room(self, version: int, trained: int, outstanding: int) -> int:
        """How many more groups may be admitted now (never negative)."""
        return max(0, self.limit(version) - self.used(trained, outstanding))
