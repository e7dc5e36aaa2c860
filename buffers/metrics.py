"""Buffer metrics: counters, windowed rates, blocked/wait time and the staleness histogram.

Times are wall-clock seconds spent *waiting* (a producer blocked on a full buffer, the trainer blocked on an empty
one), not the time of the calls. Rates are events per second over the last `window_s` seconds (or the buffer's
lifetime, if shorter), so a dashboard sees the current throughput rather than a lifetime average.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any


class _Rate:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._ev: deque[tuple[float, int]] = deque()
        self._sum = 0

    def add(self, n: int, now: float) -> None:
        self._ev.append((now, n))
        self._sum += n

    def per_s(self, now: float, since: float) -> float:
        while self._ev and self._ev[0][0] < now - self.window_s:
            self._sum -= self._ev.popleft()[1]
        span = min(self.window_s, now - since)
        return self._sum / span if span > 0 else 0.0


class BufferMetrics:
    """Everything `RolloutBuffer.stats()` reports beyond the queue and the ledger."""

    COUNTERS = ("groups_put", "samples_put", "tokens_put", "groups_got", "samples_got", "reused_got",
                "put_blocked_s", "get_wait_s")

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self.c: dict[str, float] = dict.fromkeys(self.COUNTERS, 0)
        self.staleness: Counter[int] = Counter()  # staleness of each group handed out -> count
        self._t0 = time.monotonic()
        self._put = _Rate(window_s)
        self._got = _Rate(window_s)
        self._put_s = _Rate(window_s)
        self._got_s = _Rate(window_s)

    def on_put(self, groups: int, samples: int, tokens: int) -> None:
        now = time.monotonic()
        self.c["groups_put"] += groups
        self.c["samples_put"] += samples
        self.c["tokens_put"] += tokens
        self._put.add(groups, now)
        self._put_s.add(samples, now)

    def on_get(self, staleness: list[int], samples: int, reused: int) -> None:
        now = time.monotonic()
        self.c["groups_got"] += len(staleness)
        self.c["samples_got"] += samples
        self.c["reused_got"] += reused
        self.staleness.update(staleness)
        self._got.add(len(staleness), now)
        self._got_s.add(samples, now)

    def blocked(self, key: str, seconds: float) -> None:
        self.c[key] += seconds

    def snapshot(self) -> dict[str, Any]:
        now, c, hist = time.monotonic(), self.c, self.staleness
        n = sum(hist.values())
        return {
            **{k: (int(v) if not k.endswith("_s") else v) for k, v in c.items()},
            "put_groups_per_s": self._put.per_s(now, self._t0), "get_groups_per_s": self._got.per_s(now, self._t0),
            "put_samples_per_s": self._put_s.per_s(now, self._t0),
            "get_samples_per_s": self._got_s.per_s(now, self._t0),
            "staleness_hist": dict(sorted(hist.items())),
            "staleness_mean": sum(k * v for k, v in hist.items()) / n if n else 0.0,
            "staleness_max": max(hist) if hist else 0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"counters": dict(self.c), "staleness": [[k, v] for k, v in sorted(self.staleness.items())]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore counters and the histogram (rates restart: they describe the running process)."""
        if "counters" not in d:  # the flat dict of the first buffer version
            d = {"counters": {"groups_put": d.get("put", 0), "groups_got": d.get("got", 0),
                              "put_blocked_s": d.get("put_blocked_s", 0.0), "get_wait_s": d.get("get_wait_s", 0.0)}}
        self.c.update({k: v for k, v in d["counters"].items() if k in self.c})
        self.staleness = Counter({int(k): int(v) for k, v in d.get("staleness", [])})
