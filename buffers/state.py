"""The buffer's read-outs and checkpoints: stats, ledger checks, state_dict / save / load (a mixin of RolloutBuffer).

Kept apart from queue.py so that the queue's put/get logic reads on its own; everything here only reads or
replaces the buffer's state under its condition lock.
"""

from __future__ import annotations

import os
from typing import Any

from buffers.admission import Pacing
from buffers.entry import Entry
from buffers.ledger import IN_FLIGHT, PARTIAL, QUEUED, REGENERATING, TRAINED, Ledger
from buffers.persist import read_state, write_state
from buffers.tokens import TokenLedger, generated, group_tokens
from streamrl.types import Group, decode_groups, encode
from streamrl.wire import join_groups, parse_batch


class BufferStateMixin:
    """Partial-group stash, stats(), check_ledger(), state_dict()/load_state_dict(), save()/load() for
    RolloutBuffer."""

    def stash_partials(self, groups: list[Group], reason: str = "stopped") -> None:
        """Keep unfinished groups (e.g. cut off by a stop) in the buffer, so that `save` checkpoints them.

        They become (or stay) `partial`; `take_partials` gives them back to a producer after a resume.
        """
        stashed = {g[0].group_id for g in self._partials}
        if len({g[0].group_id for g in groups} | stashed) != len(groups) + len(stashed):
            raise ValueError("stash_partials: a group is given twice or is already stashed")
        for g in groups:
            if self.ledger.state(g[0].group_id) != PARTIAL:
                self.ledger.move(g[0].group_id, PARTIAL, reason=reason)
            self._partials.append(g)

    def take_partials(self, max_n: int) -> list[Group]:
        """Up to `max_n` stashed partial groups, which become in_flight again (the producer resumes them)."""
        out, self._partials = self._partials[: max(0, max_n)], self._partials[max(0, max_n):]
        for g in out:
            self.ledger.move(g[0].group_id, IN_FLIGHT)
        return out

    def ledger_counts(self) -> dict[str, int]:
        return self.ledger.counts()

    def carried_tokens(self) -> dict[str, int]:
        """Generated tokens of the outstanding groups the buffer holds: queued, stashed partial, regenerating."""
        return {"queued": sum(generated(e.meta.resp, e.meta.discarded) for e in self._held + self._q),
                "partial": sum(generated(*group_tokens(g)) for g in self._partials),
                "regenerating": sum(generated(*group_tokens(g)) for g in self._regenerate)}

    def token_ledger(self) -> dict[str, Any]:
        """Settled tokens (trained, discarded by reason) and the tokens carried in the buffer."""
        return {**self.tokens.to_dict(), "carried": self.carried_tokens()}

    def check_ledger(self, full: bool = True) -> dict[str, int]:
        """Raise AssertionError unless the ledger adds up and agrees with the queue, the regenerate list, the
        stashed partials and the replay store; return the counts. `full=False`: no recount of every group's state
        (the per-step check; its cost follows the queue, not the job's length)."""
        counts = self.ledger.check(recount=full)
        if counts[QUEUED] != self.size() or counts[REGENERATING] != len(self._regenerate):
            raise AssertionError(f"ledger {counts} disagrees with {self.size()} queued and "
                                 f"{len(self._regenerate)} regenerating groups")
        queued = [e.gid for e in self._held + self._q]
        if len(set(queued)) != len(queued) or any(self.ledger.state(g) != QUEUED for g in queued):
            raise AssertionError("a queued group is duplicated or not queued in the ledger")
        if any(self.ledger.state(g) != TRAINED for g in self._replay.gids()):
            raise AssertionError("the replay store holds a group that is not trained")
        if any(self.ledger.state(g[0].group_id) != PARTIAL for g in self._partials):
            raise AssertionError("a stashed partial group is not partial in the ledger")
        return counts

    def stats(self) -> dict[str, Any]:
        """Fill level, token use, rates, blocked/wait times, staleness histogram of handed-out groups, ledger counts,
        drops and requeues by reason, replay and reuse counts. Times in seconds, rates per second.

        `put_blocked_s`: producers' time blocked on a full buffer; `get_wait_s`: the trainer's time waiting for
        groups; `staleness_hist`: {staleness: groups handed out}; `drops` / `requeues`: {reason: groups} for
        `--stale-policy drop` / `regenerate`; `reuse_counts`: {uses: trained groups}.
        """
        reasons = self.ledger.reasons()

        def by(prefix: str) -> dict[str, int]:
            return {k.split("/", 1)[1]: v for k, v in reasons.items() if k.startswith(prefix + "/")}

        return {
            "size": self.size(), "capacity": self.capacity, "fill": self.size() / self.capacity,
            "tokens": self._tokens, "max_tokens": self.max_tokens, "version": self.version, "closed": self._closed,
            "admitted": self.ledger.admitted, "ledger": self.ledger.counts(), "reasons": reasons,
            "drops": by("dropped_stale"), "requeues": by("regenerating"), "regenerate_pending": len(self._regenerate),
            "partials": len(self._partials), "replay_size": len(self._replay), "reused": self.ledger.reused,
            "reuse_counts": self.ledger.reuse_counts(), "replay_evicted": dict(+self._replay.evicted),
            "tokens_trained": self.tokens.trained, "tokens_wasted": self.tokens.wasted,
            "tokens_discarded": dict(self.tokens.discarded), "slots": self.slots(),
            **self.metrics.snapshot(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed job needs (see buffers/persist.py); group payloads as msgpack bytes."""
        sd_filter = getattr(self._filter, "state_dict", None)
        return {
            "groups": join_groups([e.raw for e in self._held + self._q]),
            "regenerate": encode(self._regenerate),
            "partials": encode(self._partials),
            "replay": self._replay.state_dict(),
            "ledger": self.ledger.to_dict(),
            "tokens": self.tokens.to_dict(),
            "pacing": {"max_staleness": self.pacing.max_staleness, "update_interval": self.pacing.update_interval,
                       "groups_per_step": self.pacing.groups_per_step, "group_size": self.group_size},
            "version": self.version,
            "metrics": self.metrics.state_dict(),
            "filter": sd_filter() if callable(sd_filter) else None,
        }

    async def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a `state_dict` (replaces queue, lists, replay, ledger, version, metrics, filter state) and check
        that it adds up. The buffer must not be serving a get."""
        if self._get_lock.locked():
            raise RuntimeError("load_state_dict while a get is in progress")
        async with self._cond:
            self._q, self._held = [Entry(m, raw=r) for m, r in parse_batch(sd["groups"])], []
            self._tokens = sum(e.meta.ntokens for e in self._q)
            self._regenerate = decode_groups(sd["regenerate"])
            self._partials = decode_groups(sd["partials"]) if sd.get("partials") else []
            if sd.get("replay"):
                self._replay.load_state_dict(sd["replay"])
            self.ledger = Ledger.from_dict(sd["ledger"])
            self.tokens = TokenLedger.from_dict(sd.get("tokens"))
            saved_n = (sd.get("pacing") or {}).get("group_size", self.group_size)
            if saved_n != self.group_size:  # queued groups have the old size: nothing sensible to adapt to
                raise ValueError(f"the checkpoint's groups have {saved_n} samples but --n-samples-per-prompt is "
                                 f"{self.group_size}: resume with --n-samples-per-prompt {saved_n}")
            self.pacing = Pacing(self.pacing.max_staleness, self.pacing.update_interval, self.pacing.groups_per_step,
                                 origin_trained=self.ledger.counts()[TRAINED])  # set_pacing_origin sets the rest
            self.version = int(sd["version"])
            self.metrics.load_state_dict(sd.get("metrics") or {})
            load_filter = getattr(self._filter, "load_state_dict", None)
            if sd.get("filter") is not None and callable(load_filter):
                load_filter(sd["filter"])
            self.check_ledger()
            self._cond.notify_all()

    def save(self, path: str | os.PathLike) -> str:
        """Write the buffer's state to `path` (msgpack; atomic: temp file + rename). Returns the path."""
        write_state(path, self.state_dict())
        return str(path)

    async def load(self, path: str | os.PathLike) -> dict[str, int]:
        """Restore a `save`d buffer; returns the ledger counts."""
        await self.load_state_dict(read_state(path))
        return self.ledger.counts()
