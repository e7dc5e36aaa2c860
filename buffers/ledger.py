"""The ledger: every group admitted from the data source is in exactly one state, so nothing is lost or replayed.

States (strings, so that checkpoints and logs stay readable):

    in_flight ──> partial ──> in_flight ...           (aborted by a weight update, resumed later)
        │            │
        └────────────┴──> queued ──> trained          (terminal, with the train step: never trained twice)
                                 ├──> dropped_stale   (terminal, --stale-policy drop)
                                 └──> regenerating ──> in_flight   (--stale-policy regenerate: back to a producer)
    filtered / failed / dropped_stale are terminal too, each with a reason that `reasons()` counts.

The counts always add up to `admitted` (`check()`); `to_dict()/from_dict()` go into checkpoints.

Replay (`--max-reuse R > 1`) hands a trained group out again: it stays `trained` (one group, counted once) and
`reuse()` raises its use count, so `uses(gid)` is how many train steps it went into (at most R).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

IN_FLIGHT = "in_flight"
PARTIAL = "partial"
QUEUED = "queued"
REGENERATING = "regenerating"
TRAINED = "trained"
FILTERED = "filtered"
FAILED = "failed"
DROPPED_STALE = "dropped_stale"

STATES = (IN_FLIGHT, PARTIAL, QUEUED, REGENERATING, TRAINED, FILTERED, FAILED, DROPPED_STALE)
TERMINAL = frozenset({TRAINED, FILTERED, FAILED, DROPPED_STALE})

# Allowed transitions. Terminal states have none: that is what makes "trained twice" impossible.
TRANSITIONS: dict[str, frozenset[str]] = {
    IN_FLIGHT: frozenset({PARTIAL, QUEUED, FILTERED, FAILED, DROPPED_STALE}),
    PARTIAL: frozenset({IN_FLIGHT, QUEUED, FILTERED, FAILED, DROPPED_STALE}),
    QUEUED: frozenset({TRAINED, DROPPED_STALE, REGENERATING, FILTERED}),
    REGENERATING: frozenset({IN_FLIGHT}),  # a producer takes it back first; it then moves on from in_flight
    **{s: frozenset() for s in TERMINAL},
}


class LedgerError(ValueError):
    """An impossible bookkeeping step: unknown group, double admission or a forbidden transition."""


class Ledger:
    """Tracks each group (by `group_id`) in exactly one state; see the module docstring for the state machine."""

    def __init__(self) -> None:
        self._state: dict[str, str] = {}
        self._step: dict[str, int] = {}  # train step of each trained group
        self._reason: dict[str, str] = {}  # last reason given for each group
        self._reasons: Counter[str] = Counter()  # "state/reason" -> number of moves with that reason
        self._counts: Counter[str] = Counter()
        self._uses: dict[str, int] = {}  # trained groups handed out more than once -> total uses (>= 2)
        self._reused = 0  # handouts that were reuses (sum of uses - 1)

    @property
    def admitted(self) -> int:
        """Groups taken from the data source so far."""
        return len(self._state)

    def __contains__(self, gid: str) -> bool:
        return gid in self._state

    def admit(self, gid: str) -> None:
        """Record a new group taken from the data source; it starts `in_flight`."""
        if not gid:
            raise LedgerError("cannot admit a group without a group_id")
        if gid in self._state:
            raise LedgerError(f"group {gid!r} was already admitted (state {self._state[gid]})")
        self._state[gid] = IN_FLIGHT
        self._counts[IN_FLIGHT] += 1

    def state(self, gid: str) -> str | None:
        """The group's state, or None if it was never admitted."""
        return self._state.get(gid)

    def step(self, gid: str) -> int | None:
        """The train step of a trained group."""
        return self._step.get(gid)

    def reason(self, gid: str) -> str | None:
        """The last reason recorded for the group (filter, failure or staleness)."""
        return self._reason.get(gid)

    def check_move(self, gid: str, state: str) -> None:
        """Raise LedgerError unless `gid` may move to `state` now."""
        if state not in TRANSITIONS:
            raise LedgerError(f"unknown ledger state {state!r}; states: {', '.join(STATES)}")
        cur = self._state.get(gid)
        if cur is None:
            raise LedgerError(f"group {gid!r} was never admitted")
        if cur == TRAINED:
            raise LedgerError(f"group {gid!r} was already trained (step {self._step.get(gid)}): cannot move to {state}")
        if state not in TRANSITIONS[cur]:
            allowed = ", ".join(sorted(TRANSITIONS[cur])) or "none (terminal)"
            raise LedgerError(f"group {gid!r}: {cur} -> {state} is not allowed (from {cur}: {allowed})")

    def move(self, gid: str, state: str, reason: str | None = None, step: int | None = None) -> None:
        """Move a group to `state`, recording the reason (filtered/failed/dropped) or the train step (trained)."""
        self.check_move(gid, state)
        if state == TRAINED and step is None:
            raise LedgerError(f"group {gid!r}: moving to trained needs the train step")
        cur = self._state[gid]
        self._counts[cur] -= 1
        self._counts[state] += 1
        self._state[gid] = state
        if step is not None:
            self._step[gid] = int(step)
        if reason is not None:
            self._reason[gid] = reason
            self._reasons[f"{state}/{reason}"] += 1

    def reuse(self, gid: str) -> int:
        """Record one more handout of a trained group (replay); returns its total uses."""
        if self._state.get(gid) != TRAINED:
            raise LedgerError(f"group {gid!r} is {self._state.get(gid)}: only trained groups can be reused")
        self._uses[gid] = self._uses.get(gid, 1) + 1
        self._reused += 1
        return self._uses[gid]

    def uses(self, gid: str) -> int:
        """How many train steps the group went into (0 unless trained)."""
        return self._uses.get(gid, 1) if self._state.get(gid) == TRAINED else 0

    def reuse_counts(self) -> dict[int, int]:
        """Trained groups by number of uses, e.g. `{1: 90, 2: 10}` (10 groups were trained twice)."""
        hist = Counter(self._uses.values())
        once = self._counts[TRAINED] - len(self._uses)
        return {**({1: once} if once else {}), **dict(sorted(hist.items()))}

    @property
    def reused(self) -> int:
        """Handouts that were reuses of an already trained group."""
        return self._reused

    def counts(self) -> dict[str, int]:
        """Number of groups in each state (every state listed, zeros included)."""
        return {s: self._counts[s] for s in STATES}

    def reasons(self) -> dict[str, int]:
        """How often each `state/reason` was recorded (e.g. `filtered/zero_std`, `dropped_stale/staleness=3`)."""
        return dict(self._reasons)

    def gids(self, state: str) -> list[str]:
        """Group ids currently in `state`, in admission order."""
        return [g for g, s in self._state.items() if s == state]

    def check(self, recount: bool = True) -> dict[str, int]:
        """Raise AssertionError unless the state counts add up to `admitted`; return the counts. `recount=False`
        skips recounting every group's state (O(groups)): the cheap check a driver can afford every step."""
        counts = self.counts()
        again = Counter(self._state.values()) if recount else counts
        if sum(counts.values()) != self.admitted or any(again[s] != counts[s] for s in STATES):
            raise AssertionError(f"ledger does not add up: counts {counts}, admitted {self.admitted}")
        return counts

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-able snapshot for checkpoints."""
        return {
            "state": dict(self._state),
            "step": dict(self._step),
            "reason": dict(self._reason),
            "reasons": dict(self._reasons),
            "uses": dict(self._uses),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ledger:
        """Rebuild a ledger saved by `to_dict`."""
        led = cls()
        for gid, state in d["state"].items():
            if state not in TRANSITIONS:
                raise LedgerError(f"checkpointed group {gid!r} has unknown state {state!r}")
            led._state[gid] = state
        led._step = {k: int(v) for k, v in d.get("step", {}).items()}
        led._reason = dict(d.get("reason", {}))
        led._reasons = Counter(d.get("reasons", {}))
        led._counts = Counter(led._state.values())
        led._uses = {k: int(v) for k, v in d.get("uses", {}).items()}
        led._reused = sum(v - 1 for v in led._uses.values())
        return led
