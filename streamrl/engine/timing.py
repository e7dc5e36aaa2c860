"""Where an engine iteration's time goes: device time per phase (decode, prefill, sample) and the host's share.

On CUDA, phases are delimited by CUDA events recorded on the engine's stream, so their time is what the device
spent (including waiting behind another process's kernels when the GPU is shared), read back after the iteration's
one host sync. On CPU the work is synchronous and the same marks use the wall clock. `totals` accumulate seconds
per phase over the engine's life; `/server_info` reports them (scripts/bench/async_vs_sync_gpu.py reads them).
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    """`begin()` at the start of an iteration, `mark(phase)` after each phase's work is queued, `end()` after the
    iteration's host sync: adds each phase's time, and the iteration's wall time not covered by them as "host"."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._marks: list[tuple[str, object]] = []
        self._t0 = 0.0
        self._events: list[torch.cuda.Event] = []  # reused every iteration (a decode step is on the hot path)

    def _stamp(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        if len(self._marks) == len(self._events):
            self._events.append(torch.cuda.Event(enable_timing=True))
        ev = self._events[len(self._marks)]
        ev.record()
        return ev

    def begin(self) -> None:
        self._t0 = time.perf_counter()
        self._marks = []  # an iteration that failed midway leaves nothing behind
        self._marks.append(("", self._stamp()))

    def mark(self, phase: str) -> None:
        if self._marks:
            self._marks.append((phase, self._stamp()))

    def end(self) -> None:
        """Call after a host sync (the iteration's `.tolist()`), so every event has completed."""
        if not self._marks:
            return
        wall = time.perf_counter() - self._t0
        device = 0.0
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:], strict=False):
            dt = a.elapsed_time(b) / 1000 if self.cuda else b - a
            self.totals[phase] = self.totals.get(phase, 0.0) + dt
            device += dt
        self.totals["host"] = self.totals.get("host", 0.0) + max(wall - device, 0.0)
        self._marks = []
