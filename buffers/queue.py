"""The rollout buffer: a bounded, versioned queue of groups between producers and the trainer (a Ray async actor).

Producers `put` completed groups (blocking while the buffer is full: backpressure, never a drop); the driver
`get`s one batch of groups per train step. Two forms, freely mixed: `put_encoded`/`get_encoded` (msgpack bytes
with their metadata beside them, which the buffer never decodes on the way: what the producers and the driver
use, streamrl/wire.py) and `put`/`get` (Sample objects, pickled by Ray: tests and plug-ins).
Every group is tracked in the Ledger; `check_ledger()` proves that nothing was lost or trained twice. The ledger
is also the one owner of admission pacing (`admission_room`, buffers/admission.py) and of the token ledger of
settled groups (buffers/tokens.py). The buffer filter decides the order; staleness is checked at `get` against
the version set by the driver after each publish, and `--stale-policy` handles what went stale.

Bounds: `--async-buffer-size` groups, and optionally `--async-buffer-max-tokens` tokens queued. The token bound
never blocks a group when the buffer is empty or when the waiting trainer lacks groups (else a batch of large
groups could never form). Replay (`--max-reuse`) is described in buffers/replay.py, persistence in persist.py.

`RolloutBuffer` is a plain class (usable directly under asyncio in tests); `make_buffer_actor` wraps it.
All blocking methods are `async`, so a put blocked on a full buffer does not block `get` calls.
Shutdown: `close()` wakes every waiter; blocked and later puts raise BufferClosed, gets drain what is queued and
then raise. A caller cancelled mid-call (a producer task dying) leaves the buffer consistent: the groups put
before the cancellation stay, a get's held groups go back in front.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from buffers.admission import Pacing, groups_per_step
from buffers.entry import Entry
from buffers.filters import load_buffer_filter
from buffers.ledger import DROPPED_STALE, FAILED, FILTERED, IN_FLIGHT, PARTIAL, QUEUED, REGENERATING, TRAINED, Ledger
from buffers.metrics import BufferMetrics
from buffers.replay import ReplayStore, Reuse
from buffers.state import BufferStateMixin
from buffers.tokens import TokenLedger
from streamrl.types import Group
from streamrl.wire import join_groups, parse_batch

MARKABLE = frozenset({IN_FLIGHT, PARTIAL, FILTERED, FAILED, DROPPED_STALE})  # states producers may set via mark()
OUTSTANDING = (IN_FLIGHT, PARTIAL, QUEUED, REGENERATING)  # admitted, not yet trained nor discarded: hold a slot


class BufferClosed(RuntimeError):
    """The buffer was closed: a blocked or later put fails, a get that cannot be filled fails."""


class RolloutBuffer(BufferStateMixin):
    """Bounded FIFO (or filter-ordered) queue of groups with a ledger; see the module docstring."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.capacity = int(args.async_buffer_size)
        self.max_staleness = int(args.max_staleness)
        self.stale_policy = args.stale_policy
        self.group_size = int(args.n_samples_per_prompt)
        self.max_tokens = args.async_buffer_max_tokens
        max_reuse = int(args.max_reuse or 1)
        if self.capacity < 1 or self.group_size < 1 or self.max_staleness < 0 or max_reuse < 1:
            raise ValueError("need async_buffer_size, n_samples_per_prompt, max_reuse >= 1 and max_staleness >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"async_buffer_max_tokens must be >= 1 (or None), got {self.max_tokens}")
        if self.stale_policy not in ("drop", "regenerate"):
            raise ValueError(f"stale_policy must be 'drop' or 'regenerate', got {self.stale_policy!r}")
        self._filter = load_buffer_filter(args.buffer_filter_path)
        self._q: list[Entry] = []
        self._held: list[Entry] = []  # fresh groups taken by the get in progress: still queued, still counted
        self._tokens = 0  # tokens over _q and _held
        self._want = 0  # groups the waiting get still lacks: the token bound yields to it
        self._regenerate: list[Group] = []
        self._partials: list[Group] = []
        self._replay = ReplayStore(max_reuse, self.capacity)
        self.ledger = Ledger()
        self.tokens = TokenLedger()
        self.pacing = Pacing(self.max_staleness, int(args.update_weights_interval), groups_per_step(args))
        self.metrics = BufferMetrics()
        self.version = 0
        self._closed = False
        self._cond = asyncio.Condition()
        self._get_lock = asyncio.Lock()  # one consumer at a time: held groups then never starve each other

    @property
    def groups(self) -> list[Group]:
        """The queued groups (not those held by a get in progress), in queue order. A copy of the list."""
        return [e.group for e in self._q]

    # -- producers ------------------------------------------------------------------------------------------
    def _fits(self, e: Entry) -> bool:
        size = len(self._q) + len(self._held)
        if size >= self.capacity:
            return False
        return (self.max_tokens is None or size == 0 or self._tokens + e.meta.ntokens <= self.max_tokens
                or self._want > len(self._q))

    def _validate(self, entries: list[Entry]) -> None:
        seen: set[str] = set()
        stashed = {g[0].group_id for g in self._partials}
        for e in entries:
            m = e.meta
            if m.size != self.group_size:
                raise ValueError(f"group {m.gid!r} has {m.size} samples; n_samples_per_prompt is {self.group_size}")
            if not m.gid:
                raise ValueError("every sample of a group needs the same non-empty group_id")
            if m.gid in seen:
                raise ValueError(f"group {m.gid!r} appears twice in one put")
            if m.gid in stashed:
                raise ValueError(f"group {m.gid!r} is stashed as partial: take_partials() it first")
            if m.gid in self.ledger:
                self.ledger.check_move(m.gid, QUEUED)
            seen.add(m.gid)

    async def _put(self, entries: list[Entry], timeout: float | None) -> int:
        self._validate(entries)
        done = 0
        try:
            async with asyncio.timeout(timeout), self._cond:
                for e in entries:
                    if not self._closed and not self._fits(e):
                        t0 = time.perf_counter()
                        try:
                            await self._cond.wait_for(lambda: self._closed or self._fits(e))  # noqa: B023
                        finally:
                            self.metrics.blocked("put_blocked_s", time.perf_counter() - t0)
                    if self._closed:
                        raise BufferClosed(f"buffer closed: {done} of {len(entries)} groups were put")
                    if e.gid not in self.ledger:
                        self.ledger.admit(e.gid)
                    self.ledger.move(e.gid, QUEUED)
                    self._q.append(e)
                    self._tokens += e.meta.ntokens
                    done += 1
                    self.metrics.on_put(1, e.meta.size, e.meta.ntokens)
                    self._cond.notify_all()
        except TimeoutError:
            raise TimeoutError(f"put: buffer full ({self.capacity} groups) for {timeout}s; "
                               f"{done} of {len(entries)} groups were put") from None
        return done

    async def put(self, groups: list[Group], timeout: float | None = None) -> int:
        """Append groups in order, waiting while the buffer is full; return how many were put.

        A group not admitted before is admitted here. Raises TimeoutError after `timeout` seconds (the groups
        before the one that timed out stay put), BufferClosed if the buffer is or gets closed, ValueError for a
        malformed group (nothing is put then).
        """
        return await self._put([Entry.of(g) for g in groups], timeout)

    async def put_encoded(self, data: bytes, timeout: float | None = None) -> int:
        """`put` for groups as bytes: `streamrl.wire.encode_batch(groups)` (fastest) or `streamrl.types.encode`."""
        return await self._put([Entry(m, raw=r) for m, r in parse_batch(data)], timeout)

    def admit(self, gids: list[str]) -> None:
        """Record groups taken from the data source (state in_flight). All or nothing."""
        if len(set(gids)) != len(gids) or any(g in self.ledger for g in gids):
            raise ValueError(f"admit: duplicate or already admitted group ids in {gids!r:.200}")
        for gid in gids:
            self.ledger.admit(gid)

    def mark(self, gid: str, state: str, reason: str | None = None,
             tokens: tuple[int, dict[str, int]] | None = None) -> None:
        """Producer-side ledger moves: in_flight, partial, filtered, failed, dropped_stale (with a reason).

        A move to a terminal state settles the group's tokens: `tokens` is `buffers.tokens.group_tokens(group)`
        (held, discarded by reason), required there. Its admission slot comes back with it."""
        if state not in MARKABLE:
            raise ValueError(f"mark: state {state!r} is set by the buffer itself; allowed: {sorted(MARKABLE)}")
        if self.ledger.state(gid) in (QUEUED, REGENERATING) or any(g[0].group_id == gid for g in self._partials):
            raise ValueError(f"mark: group {gid!r} is {self.ledger.state(gid)} in the buffer")
        terminal = state in (FILTERED, FAILED, DROPPED_STALE)
        if terminal and tokens is None:
            raise ValueError(f"mark: moving group {gid!r} to {state} needs its tokens (held, discarded)")
        self.ledger.move(gid, state, reason=reason)
        if terminal:
            self.tokens.settle(tokens[0], tokens[1], state)

    def state_of(self, gid: str) -> str | None:
        """The group's ledger state (None if never admitted)."""
        return self.ledger.state(gid)

    # -- admission pacing (one owner: this ledger) -----------------------------------------------------------
    def slots(self, version: int | None = None) -> dict[str, int]:
        """Pacing read-out: groups trained since the pacing origin + outstanding (`used`) against `limit` at
        `version` (the newer of it and the buffer's)."""
        v = self.version if version is None else max(self.version, version)
        counts = self.ledger.counts()
        outstanding = sum(counts[s] for s in OUTSTANDING)
        used = self.pacing.used(counts[TRAINED], outstanding)
        return {"used": used, "limit": self.pacing.limit(v), "outstanding": outstanding,
                "room": self.pacing.room(v, counts[TRAINED], outstanding)}

    def admission_room(self, version: int | None = None) -> int:
        """How many new groups producers may admit now (staleness pacing). `version`: the producers' copy, which
        the driver sets as soon as every engine holds the new weights, a moment before the buffer's. Resumed
        groups (partials, regenerations) already hold their slot and need none."""
        return self.slots(version)["room"]

    def set_pacing_origin(self, step: int, version: int) -> None:
        """Restart pacing at a resumed job's position (train steps done, version published) with this buffer's
        flags; groups trained before it hold no slot (buffers/admission.py)."""
        self.pacing = Pacing(self.max_staleness, self.pacing.update_interval, self.pacing.groups_per_step,
                             origin_step=int(step), origin_version=int(version),
                             origin_trained=self.ledger.counts()[TRAINED])

    def take_regenerate(self, max_n: int) -> list[Group]:
        """Up to `max_n` stale groups (responses reset) for producers to generate again; they become in_flight."""
        max_n = max(0, max_n)
        out, self._regenerate = self._regenerate[:max_n], self._regenerate[max_n:]
        for g in out:
            self.ledger.move(g[0].group_id, IN_FLIGHT)
        return out

    # -- trainer ----------------------------------------------------------------------------------------------
    def _staleness(self, e: Entry) -> int:
        # Clamped: the buffer learns of a publish after the engines do, so a token may be newer than `version`.
        return 0 if e.meta.vmin is None else max(0, self.version - e.meta.vmin)

    def _select(self, step: int, k: int) -> list[Entry]:
        order = getattr(self._filter, "order", None)
        if order is not None:  # a built-in: ordered on metadata, nothing is decoded
            idx = order(self.args, step, [e.meta for e in self._q], k)
            if len(idx) > k or len(set(idx)) != len(idx) or not all(0 <= i < len(self._q) for i in idx):
                raise RuntimeError(f"buffer filter {self._filter.__name__} returned bad indices {idx[:8]}")
            sel, chosen = [self._q[i] for i in idx], set(idx)
            rest = [e for i, e in enumerate(self._q) if i not in chosen]
        else:  # a user filter: the slime contract on real Samples
            by_id = {id(e.group): e for e in self._q}
            buffer = [e.group for e in self._q]
            before = list(buffer)
            out = self._filter(self.args, step, buffer, k)
            # The slime contract: return at most k groups and pop exactly those. Anything else would lose or duplicate.
            if len(out) > k or sorted(map(id, out + buffer)) != sorted(map(id, before)):
                raise RuntimeError(f"buffer filter {self._filter.__name__} must pop the (at most {k}) groups it "
                                   "returns")
            sel, rest = [by_id[id(g)] for g in out], [by_id[id(g)] for g in buffer]
        if not sel and k:
            raise RuntimeError(f"buffer filter {self._filter.__name__} returned no group from {len(self._q)} queued")
        self._q = rest
        return sel

    def _retire_stale(self, e: Entry, staleness: int) -> None:
        gid, reason = e.gid, f"staleness={staleness}"
        self._tokens -= e.meta.ntokens
        if self.stale_policy == "drop":
            self.ledger.move(gid, DROPPED_STALE, reason=reason)
            self.tokens.settle(e.meta.resp, e.meta.discarded, DROPPED_STALE)
            return
        g = e.group
        for s in g:
            s.reset_response("stale_regenerate")
        self.ledger.move(gid, REGENERATING, reason=reason)
        self._regenerate.append(g)

    def _keep_fresh(self, entries: list[Entry]) -> list[Entry]:
        """Retire the stale entries (stale policy), return the others."""
        fresh = []
        for e in entries:
            st = self._staleness(e)
            if st > self.max_staleness:
                self._retire_stale(e, st)
            else:
                fresh.append(e)
        return fresh

    async def _take(self, n: int, step: int, timeout: float | None) -> list[Entry]:
        """The batch for `get`/`get_encoded`: fresh groups (filter order), then reused ones; see `get`."""
        if not 1 <= n <= self.capacity:
            raise ValueError(f"get({n}): n must be in 1..async_buffer_size={self.capacity} (or it never fills)")
        reused: list[Reuse] = []
        try:
            async with asyncio.timeout(timeout), self._get_lock, self._cond:
                try:
                    while True:
                        self._held = self._keep_fresh(self._held)  # a publish during a wait can age held groups
                        need = n - len(self._held)
                        if need == 0:
                            break
                        spare = self._replay.eligible(self.version, self.max_staleness)
                        if len(self._q) + spare < need:
                            if self._closed:
                                raise BufferClosed(f"buffer closed with {len(self._q)} groups queued; get({n}) "
                                                   f"had {len(self._held)}")
                            self._want = need
                            self._cond.notify_all()  # producers held back only by the token bound may go on
                            t0 = time.perf_counter()
                            try:
                                await self._cond.wait_for(
                                    lambda: self._closed or len(self._q) + spare >= need)  # noqa: B023
                            finally:
                                self._want = 0
                                self.metrics.blocked("get_wait_s", time.perf_counter() - t0)
                        elif self._q:
                            self._held += self._keep_fresh(self._select(step, min(need, len(self._q))))
                            self._cond.notify_all()  # stale groups freed space for producers
                        else:  # nothing fresh queued: reuse instead of waiting (buffers/replay.py)
                            reused = self._replay.take(need, self.version, self.max_staleness)
                            break
                except BaseException:
                    self._replay.untake(reused)
                    self._q[:0] = self._held  # back in front, in order: nothing is lost on timeout/close
                    self._held = []
                    raise
                return self._commit(step, reused)
        except TimeoutError:
            raise TimeoutError(f"get({n}): only {len(self._q)} groups queued after {timeout}s") from None

    def _commit(self, step: int, reused: list[Reuse]) -> list[Entry]:
        out, self._held = self._held + [r.entry for r in reused], []
        for e in out[: len(out) - len(reused)]:
            self.ledger.move(e.gid, TRAINED, step=step)
            self.tokens.settle(e.meta.resp, e.meta.discarded, TRAINED)
            self._tokens -= e.meta.ntokens
            self._replay.add(e)
        for r in reused:
            self.ledger.reuse(r.entry.gid)
        self.metrics.on_get([self._staleness(e) for e in out], sum(e.meta.size for e in out), len(reused))
        self._cond.notify_all()  # space freed: blocked producers go on
        return out

    async def get(self, n: int, step: int, timeout: float | None = None) -> list[Group]:
        """Take `n` groups for train step `step`, in the filter's order; they are marked trained.

        Waits until enough groups are queued. Selected groups staler than max_staleness follow the stale policy
        and are replaced by more. With `--max-reuse R > 1`, when fewer fresh groups than needed are queued the
        batch is topped up with already trained groups (used fewer than R times, still within the staleness
        bound) instead of waiting. Raises TimeoutError after `timeout` seconds and BufferClosed when the buffer
        is closed with fewer than needed; in both cases the fresh groups already taken go back in front.
        """
        return [e.group for e in await self._take(n, step, timeout)]

    async def get_encoded(self, n: int, step: int, timeout: float | None = None) -> bytes:
        """`get`, as the msgpack of `list[list[Sample]]`: read it with `streamrl.wire.decode_batch` (or
        `streamrl.types.decode_groups`). Groups that arrived encoded are passed through without decoding."""
        return join_groups([e.raw for e in await self._take(n, step, timeout)])

    # -- driver, lifecycle ---------------------------------------------------------------------------------------
    def set_version(self, v: int) -> None:
        """The policy version after a publish (never decreases)."""
        if v < self.version:
            raise ValueError(f"version went back from {self.version} to {v}")
        self.version = int(v)

    def get_version(self) -> int:
        return self.version

    def size(self) -> int:
        """Groups queued (including those held by a get in progress)."""
        return len(self._q) + len(self._held)

    async def close(self) -> None:
        """Wake every waiter: blocked and later puts raise BufferClosed; gets drain what is queued, then raise."""
        self._closed = True
        async with self._cond:
            self._cond.notify_all()


def make_buffer_actor(args: Any, num_cpus: float = 0) -> Any:
    """Start the buffer as a Ray async actor (many concurrent calls, so blocked puts never block gets)."""

    return ray.remote(num_cpus=num_cpus, max_concurrency=1000)(RolloutBuffer).remote(args)
