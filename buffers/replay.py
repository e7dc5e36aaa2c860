"""Off-policy replay: trained groups that the buffer may hand out again (`--max-reuse R`, default 1 = off).

Semantics (what `RolloutBuffer.get` does with it):
  * After a group is handed out for the first time (ledger: `trained`), a bytes snapshot of it enters the store
    with 1 use. It can be handed out again until it has been used R times in total.
  * Reuse only replaces waiting: a `get(n)` takes fresh groups first (through the buffer filter); only when fewer
    than needed are queued does it top the batch up from the store instead of waiting. So with a fast producer
    nothing is ever reused, and with a slow one the trainer keeps training on recent data. Fresh groups come first
    in the batch, reused ones after.
  * A reused group must be within `--max-staleness` of the current version (`version - oldest token version`),
    like a fresh one; a group that goes past it is evicted (versions never go back, so it can never come back).
  * Among eligible groups, the least used go first, then the earliest trained (closest to going stale).
  * The store holds at most `capacity` groups (the buffer passes `--async-buffer-size`); the earliest trained is
    evicted first. Evictions are counted by reason: `stale`, `used_up`, `capacity`.
  * The ledger is untouched except for the use count (`Ledger.reuse`): a reused group is still one `trained` group.
  * Each handout decodes fresh Sample objects from the snapshot, so a trainer mutating a batch cannot change what
    a later reuse sees.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

from buffers.entry import Entry
from streamrl.wire import join_groups, parse_batch


class Reuse(NamedTuple):
    """One handout from the store."""

    entry: Entry  # bytes-only: its `group` decodes fresh Samples
    uses: int  # total uses of the group, this one included
    seq: int  # order of first training (kept so that `untake` restores the order)


class ReplayStore:
    """Trained groups eligible for reuse; see the module docstring."""

    def __init__(self, max_reuse: int, capacity: int) -> None:
        if max_reuse < 1 or capacity < 1:
            raise ValueError(f"max_reuse ({max_reuse}) and capacity ({capacity}) must be >= 1")
        self.max_reuse, self.capacity = int(max_reuse), int(capacity)
        self._items: dict[str, list] = {}  # gid -> [bytes-only Entry, uses so far, seq (order of first training)]
        self._seq = 0
        self.evicted: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self.max_reuse > 1

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, gid: str) -> bool:
        return gid in self._items

    def gids(self) -> list[str]:
        return list(self._items)

    def add(self, entry: Entry) -> None:
        """A group was just trained for the first time: keep a snapshot with 1 use (no-op when R == 1)."""
        if not self.enabled:
            return
        self._items[entry.gid] = [entry.snapshot(), 1, self._seq]
        self._seq += 1
        while len(self._items) > self.capacity:
            del self._items[min(self._items, key=lambda g: self._items[g][2])]
            self.evicted["capacity"] += 1

    def prune(self, version: int, max_staleness: int) -> None:
        """Evict every group staler than `max_staleness` at `version`."""
        stale = [g for g, (e, _, _) in self._items.items() if e.meta.vmin is not None
                 and version - e.meta.vmin > max_staleness]
        for g in stale:
            del self._items[g]
        self.evicted["stale"] += len(stale)

    def eligible(self, version: int, max_staleness: int) -> int:
        """How many groups `take` could hand out now."""
        if not self._items:
            return 0
        self.prune(version, max_staleness)
        return len(self._items)

    def take(self, k: int, version: int, max_staleness: int) -> list[Reuse]:
        """Up to `k` eligible groups, each a fresh Entry with its total uses (this one included); used-up ones
        leave the store."""
        self.prune(version, max_staleness)
        order = sorted(self._items, key=lambda g: (self._items[g][1], self._items[g][2]))[: max(0, k)]
        out = []
        for g in order:
            item = self._items[g]
            item[1] += 1
            out.append(Reuse(item[0].snapshot(), item[1], item[2]))
            if item[1] >= self.max_reuse:
                del self._items[g]
                self.evicted["used_up"] += 1
        return out

    def untake(self, taken: list[Reuse]) -> None:
        """Undo a `take` whose batch was not handed out (timeout, close): uses go back, groups come back."""
        for r in taken:
            if r.entry.gid in self._items:
                self._items[r.entry.gid][1] -= 1
            else:
                self._items[r.entry.gid] = [r.entry.snapshot(), r.uses - 1, r.seq]
                self.evicted["used_up"] -= 1

    def state_dict(self) -> dict[str, Any]:
        items = sorted(self._items.values(), key=lambda it: it[2])
        return {"groups": join_groups([it[0].raw for it in items]), "uses": [it[1] for it in items],
                "max_reuse": self.max_reuse, "evicted": dict(self.evicted)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._items, self._seq = {}, 0
        for (meta, raw), uses in zip(parse_batch(d["groups"]), d["uses"], strict=True):
            self._items[meta.gid] = [Entry(meta, raw=raw), int(uses), self._seq]
            self._seq += 1
        self.evicted = Counter(d.get("evicted", {}))
