"""The token ledger: every generated response token is trained, discarded (with a reason) or still carried.

    generated = trained + discarded[reason] + carried (queued, partial, regenerating, in flight)

Each sample carries its own history (`Sample.discarded_tokens`: tokens generated for it and thrown away since, by
reason, written by `Sample.reset_response(reason)`), so a group's tokens are accounted for wherever the group is,
in a checkpoint too. A group's tokens are *settled* here once, when the group reaches a terminal state of the group
ledger: its held response tokens count as trained (or as discarded under the terminal state's name: `filtered`,
`failed`, `dropped_stale`) and its history goes to `discarded` by reason. Reasons recorded on samples:
`abort_restart` (an aborted request restarted from the prompt, without `--partial-rollout`), `stale_regenerate`
(`--stale-policy regenerate`), `checkpoint_resume` (in flight at a checkpoint, generated again after `--load`).

The check is against an independent count: the producers add up the tokens each engine call returned
(`tokens_generated`); a group lost or settled twice shows up as a difference (`balance`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from streamrl.types import generated_tokens as generated
from streamrl.types import group_tokens

__all__ = ["TokenLedger", "balance", "generated", "group_tokens"]


class TokenLedger:
    """Tokens of the groups that reached a terminal state, trained or discarded by reason."""

    def __init__(self) -> None:
        self.trained = 0
        self.discarded: Counter[str] = Counter()

    def settle(self, held: int, discarded: dict[str, int], outcome: str) -> None:
        """A group ended as `outcome` ("trained", or the state it was discarded in) holding `held` tokens."""
        self.discarded.update({k: v for k, v in discarded.items() if v})
        if outcome == "trained":
            self.trained += held
        elif held:
            self.discarded[outcome] += held

    @property
    def wasted(self) -> int:
        return sum(self.discarded.values())

    def to_dict(self) -> dict[str, Any]:
        return {"trained": self.trained, "discarded": dict(self.discarded)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TokenLedger:
        led = cls()
        if d:
            led.trained = int(d["trained"])
            led.discarded = Counter({k: int(v) for k, v in d["discarded"].items()})
        return led


def balance(generated_count: int, settled: dict[str, Any], carried: dict[str, int]) -> dict[str, Any]:
    """The token ledger's summary: `balanced` iff generated == trained + discarded + carried."""
    discarded = dict(settled["discarded"])
    accounted = settled["trained"] + sum(discarded.values()) + sum(carried.values())
    return {"generated": generated_count, "trained": settled["trained"], "discarded": discarded,
            "wasted": sum(discarded.values()), "carried": dict(carried), "accounted": accounted,
            "balanced": generated_count == accounted}
