"""The rollout buffer: a bounded, versioned queue of groups between producers and the trainer (a Ray async actor).

Producers `put` completed groups (blocking while the buffer is full: backpressure, never a drop); the driver
`get`s one batch of groups per train step. Transfers are batched (one call per many groups) because a round
trip through an actor costs about 2 ms. Every group is tracked in the Ledger; `check_ledger()` proves that
nothing was lost or trained twice. The buffer filter decides the order; staleness is checked at `get` against
the version set by the driver after each publish, and `--stale-policy` handles what went stale.

`RolloutBuffer` is a plain class (usable directly under asyncio in tests); `make_buffer_actor` wraps it.
All blocking methods are `async`, so a put blocked on a full buffer does not block `get` calls.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from buffers.filters import load_buffer_filter
from buffers.ledger import DROPPED_STALE, FAILED, FILTERED, IN_FLIGHT, PARTIAL, QUEUED, REGENERATING, TRAINED, Ledger
from streamrl.types import Group, Sample, group_versions

MARKABLE = frozenset({IN_FLIGHT, PARTIAL, FILTERED, FAILED, DROPPED_STALE})  # states producers may set via mark()


class BufferClosed(RuntimeError):
    """The buffer was closed: a blocked or later put fails, a get that cannot be filled fails."""


class RolloutBuffer:
    """Bounded FIFO (or filter-ordered) queue of groups with a ledger; see the module docstring."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.capacity = int(args.async_buffer_size)
        self.max_staleness = int(args.max_staleness)
        self.stale_policy = args.stale_policy
        self.group_size = int(args.n_samples_per_prompt)
        if self.capacity < 1 or self.group_size < 1 or self.max_staleness < 0:
            raise ValueError("need async_buffer_size >= 1, n_samples_per_prompt >= 1 and max_staleness >= 0")
        if self.stale_policy not in ("drop", "regenerate"):
            raise ValueError(f"stale_policy must be 'drop' or 'regenerate', got {self.stale_policy!r}")
        self._filter = load_buffer_filter(getattr(args, "buffer_filter_path", None))
        self.groups: list[Group] = []
        self._held: list[Group] = []  # fresh groups taken by the get in progress: still queued, still counted
        self._versions: dict[str, tuple[int, int] | None] = {}  # group_id -> (min, max) token version
        self._regenerate: list[Group] = []
        self.ledger = Ledger()
        self.version = 0
        self._closed = False
        self._cond = asyncio.Condition()
        self._get_lock = asyncio.Lock()  # one consumer at a time: held groups then never starve each other
        self._m = {"put": 0, "got": 0, "put_blocked_s": 0.0, "get_wait_s": 0.0, "stale_sum": 0, "stale_max": 0}

    # -- producers ------------------------------------------------------------------------------------------
    def _full(self) -> bool:
        return len(self.groups) + len(self._held) >= self.capacity

    def _validate(self, groups: list[Group]) -> list[str]:
        gids: list[str] = []
        for g in groups:
            gid = g[0].group_id if g else ""
            if len(g) != self.group_size:
                raise ValueError(f"group {gid!r} has {len(g)} samples; n_samples_per_prompt is {self.group_size}")
            if not gid or any(s.group_id != gid for s in g):
                raise ValueError(f"group {gid!r}: every sample needs the same non-empty group_id")
            if gid in gids:
                raise ValueError(f"group {gid!r} appears twice in one put")
            if gid in self.ledger:
                self.ledger.check_move(gid, QUEUED)
            gids.append(gid)
        return gids

    async def put(self, groups: list[Group], timeout: float | None = None) -> int:
        """Append groups in order, waiting while the buffer is full; return how many were put.

        A group not admitted before is admitted here. Raises TimeoutError after `timeout` seconds (the groups
        before the one that timed out stay put), BufferClosed if the buffer is or gets closed, ValueError for a
        malformed group (nothing is put then).
        """
        gids = self._validate(groups)
        done = 0
        try:
            async with asyncio.timeout(timeout), self._cond:
                for g, gid in zip(groups, gids, strict=True):
                    if self._full() and not self._closed:
                        t0 = time.perf_counter()
                        try:
                            await self._cond.wait_for(lambda: self._closed or not self._full())
                        finally:
                            self._m["put_blocked_s"] += time.perf_counter() - t0
                    if self._closed:
                        raise BufferClosed(f"buffer closed: {done} of {len(groups)} groups were put")
                    if gid not in self.ledger:
                        self.ledger.admit(gid)
                    self.ledger.move(gid, QUEUED)
                    self._versions[gid] = group_versions(g)
                    self.groups.append(g)
                    done += 1
                    self._m["put"] += 1
                    self._cond.notify_all()
        except TimeoutError:
            raise TimeoutError(f"put: buffer full ({self.capacity} groups) for {timeout}s; "
                               f"{done} of {len(groups)} groups were put") from None
        return done

    def admit(self, gids: list[str]) -> None:
        """Record groups taken from the data source (state in_flight). All or nothing."""
        if len(set(gids)) != len(gids) or any(g in self.ledger for g in gids):
            raise ValueError(f"admit: duplicate or already admitted group ids in {gids!r:.200}")
        for gid in gids:
            self.ledger.admit(gid)

    def mark(self, gid: str, state: str, reason: str | None = None) -> None:
        """Producer-side ledger moves: in_flight, partial, filtered, failed, dropped_stale (with a reason)."""
        if state not in MARKABLE:
            raise ValueError(f"mark: state {state!r} is set by the buffer itself; allowed: {sorted(MARKABLE)}")
        if self.ledger.state(gid) in (QUEUED, REGENERATING):  # the buffer holds it: a move would desync the queue
            raise ValueError(f"mark: group {gid!r} is {self.ledger.state(gid)} in the buffer")
        self.ledger.move(gid, state, reason=reason)

    def take_regenerate(self, max_n: int) -> list[Group]:
        """Up to `max_n` stale groups (responses reset) for producers to generate again; they become in_flight."""
        max_n = max(0, max_n)
        out, self._regenerate = self._regenerate[:max_n], self._regenerate[max_n:]
        for g in out:
            self.ledger.move(g[0].group_id, IN_FLIGHT)
        return out

    # -- trainer ----------------------------------------------------------------------------------------------
    def _staleness(self, g: Group) -> int:
        v = self._versions.get(g[0].group_id)
        return 0 if v is None else self.version - v[0]

    def _select(self, step: int, k: int) -> list[Group]:
        before = list(self.groups)
        sel = self._filter(self.args, step, self.groups, k)
        # The slime contract: return at most k groups and pop exactly those. Anything else would lose or duplicate.
        if len(sel) > k or sorted(map(id, sel + self.groups)) != sorted(map(id, before)):
            self.groups = before
            raise RuntimeError(f"buffer filter {self._filter.__name__} must pop the (at most {k}) groups it returns")
        if not sel and k:
            raise RuntimeError(f"buffer filter {self._filter.__name__} returned no group from {len(before)} queued")
        return sel

    def _retire_stale(self, g: Group, staleness: int) -> None:
        gid, reason = g[0].group_id, f"staleness={staleness}"
        self._versions.pop(gid, None)
        if self.stale_policy == "drop":
            self.ledger.move(gid, DROPPED_STALE, reason=reason)
            return
        for s in g:
            s.reset_response()
        self.ledger.move(gid, REGENERATING, reason=reason)
        self._regenerate.append(g)

    async def get(self, n: int, step: int, timeout: float | None = None) -> list[Group]:
        """Take `n` fresh groups for train step `step`, in the filter's order; they are marked trained.

        Waits until enough groups are queued. Selected groups staler than max_staleness follow the stale policy
        and are replaced by more. Raises TimeoutError after `timeout` seconds and BufferClosed when the buffer
        is closed with fewer than needed queued; in both cases the fresh groups already taken go back in front.
        """
        if not 1 <= n <= self.capacity:
            raise ValueError(f"get({n}): n must be in 1..async_buffer_size={self.capacity} (or it never fills)")
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout), self._get_lock, self._cond:
                try:
                    while len(self._held) < n:
                        need = n - len(self._held)
                        await self._cond.wait_for(lambda: self._closed or len(self.groups) >= need)  # noqa: B023
                        if len(self.groups) < need:
                            raise BufferClosed(f"buffer closed with {len(self.groups)} groups queued; get({n}) "
                                               f"had {len(self._held)}")
                        for g in self._select(step, need):
                            st = self._staleness(g)
                            if st > self.max_staleness:
                                self._retire_stale(g, st)
                            else:
                                self._held.append(g)
                        self._cond.notify_all()  # stale groups freed space for producers
                except BaseException:
                    self.groups[:0] = self._held  # back in front, in order: nothing is lost on timeout/close
                    self._held = []
                    raise
                out, self._held = self._held, []
                for g in out:
                    st = self._staleness(g)
                    self._m["stale_sum"] += st
                    self._m["stale_max"] = max(self._m["stale_max"], st)
                    self.ledger.move(g[0].group_id, TRAINED, step=step)
                    self._versions.pop(g[0].group_id, None)
                self._m["got"] += len(out)
                return out
        except TimeoutError:
            raise TimeoutError(f"get({n}): only {len(self.groups)} groups queued after {timeout}s") from None
        finally:
            self._m["get_wait_s"] += time.perf_counter() - t0

    # -- driver, metrics, lifecycle ------------------------------------------------------------------------------
    def set_version(self, v: int) -> None:
        """The policy version after a publish (never decreases)."""
        if v < self.version:
            raise ValueError(f"version went back from {self.version} to {v}")
        self.version = int(v)

    def get_version(self) -> int:
        return self.version

    def size(self) -> int:
        """Groups queued (including those held by a get in progress)."""
        return len(self.groups) + len(self._held)

    def ledger_counts(self) -> dict[str, int]:
        return self.ledger.counts()

    def check_ledger(self) -> dict[str, int]:
        """Raise AssertionError unless the ledger adds up and agrees with the queue and regenerate list."""
        counts = self.ledger.check()
        if counts[QUEUED] != self.size() or counts[REGENERATING] != len(self._regenerate):
            raise AssertionError(f"ledger {counts} disagrees with {self.size()} queued and "
                                 f"{len(self._regenerate)} regenerating groups")
        return counts

    def stats(self) -> dict[str, Any]:
        """Queue size, ledger counts and reasons, staleness of handed-out groups, producer blocking time."""
        m = self._m
        return {
            "size": self.size(), "capacity": self.capacity, "version": self.version, "closed": self._closed,
            "admitted": self.ledger.admitted, "ledger": self.ledger.counts(), "reasons": self.ledger.reasons(),
            "groups_put": m["put"], "groups_got": m["got"], "regenerate_pending": len(self._regenerate),
            "staleness_mean": m["stale_sum"] / m["got"] if m["got"] else 0.0, "staleness_max": m["stale_max"],
            "put_blocked_s": m["put_blocked_s"], "get_wait_s": m["get_wait_s"],
        }

    async def close(self) -> None:
        """Wake every waiter: blocked and later puts raise BufferClosed; gets drain what is queued, then raise."""
        self._closed = True
        async with self._cond:
            self._cond.notify_all()

    def state_dict(self) -> dict[str, Any]:
        """Queued and regenerate groups (msgpack bytes), ledger, version and metrics, for checkpoints."""
        return {
            "groups": msgspec.msgpack.encode(self._held + self.groups),
            "regenerate": msgspec.msgpack.encode(self._regenerate),
            "ledger": self.ledger.to_dict(),
            "version": self.version,
            "metrics": dict(self._m),
        }

    async def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a `state_dict` (replaces the queue, ledger and version) and check that it adds up."""
        if self._get_lock.locked():
            raise RuntimeError("load_state_dict while a get is in progress")
        dec = msgspec.msgpack.Decoder(list[list[Sample]])
        async with self._cond:
            self.groups, self._held = dec.decode(sd["groups"]), []
            self._regenerate = dec.decode(sd["regenerate"])
            self._versions = {g[0].group_id: group_versions(g) for g in self.groups}
            self.ledger = Ledger.from_dict(sd["ledger"])
            self.version = int(sd["version"])
            self._m.update(sd.get("metrics", {}))
            self.check_ledger()
            self._cond.notify_all()


def make_buffer_actor(args: Any, num_cpus: float = 0) -> Any:
    """Start the buffer as a Ray async actor (many concurrent calls, so blocked puts never block gets)."""
    import ray

    return ray.remote(num_cpus=num_cpus, max_concurrency=1000)(RolloutBuffer).remote(args)
