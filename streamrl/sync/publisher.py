"""WeightPublisher: one object owns a job's weight publishes, so the training loop only says "publish version v".

It runs the sync sequence of `sync_weights` (docs/design.md, "Weight sync and partial rollouts") over the job's
live engines: the engine pool drops dead engines and admits ready replacements around each sync, the trainer
stages its weights while the engines still generate and pushes them once they are paused, then the new version
goes to the buffer and the producers. It remembers the transport the trainer chose, because a CUDA IPC stage is
short enough to overlap with the pause requests.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from streamrl.sync.base import sync_weights


class WeightPublisher:
    def __init__(self, components: Any, pause_mode: str) -> None:
        self.c, self.pause_mode = components, pause_mode
        self.transport: str | None = None  # the trainer's weight transport, known after the first sync
        self._version_calls: list = []  # the producers' set_version answers, not awaited during a sync

    def before_train(self) -> None:
        """The loop's call before each train step: nothing when the engines have GPUs of their own (--colocate:
        sync/colocate.py)."""

    def publish(self, version: int) -> dict[str, float]:
        """Push the trainer's weights to every live engine as `version`; returns the sync's timings and the
        engine pool's counters."""
        c = self.c
        c.pool.before_sync()  # dead engines leave, ready replacements join (streamrl/rollout/pool.py)
        stats = sync_weights(
            c.engine_urls,
            stage=lambda: c.trainer.stage_weights(version),  # while the engines still generate
            push=lambda: c.trainer.push_staged(c.engine_urls),
            publish=lambda: self._set_version(version),
            pause_while_staging=self.transport == "ipc",  # a ~1 ms stage: overlap it with the pause
            pause_mode=self.pause_mode,
            on_dead=c.pool.drop,
        )
        c.pool.after_sync()
        self.transport = stats.pop("sync_transport", None)
        return {**stats, **c.pool.stats()}

    def _set_version(self, version: int) -> dict[str, float]:
        """Tell the buffer and the producers the new version (every engine has confirmed it).

        Only the buffer's answer is awaited (its staleness check needs the version before the next `get`). The
        producers' copy only moves admission forward, and their event loop can be busy for seconds with hundreds
        of requests in flight: waiting for it kept the engines paused that long (docs/benchmarks.md). Its answer
        is collected at a later sync or by `wait`, so an error still surfaces."""

        pending = self._version_calls
        done, pending[:] = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        ray.get(done)
        t0 = time.time()
        pending.append(self.c.manager.set_version.remote(version))
        ray.get(self.c.buffer.set_version.remote(version))
        return {"sync_set_version_time": time.time() - t0}

    def wait(self) -> None:
        """Collect the producers' answers to the version calls (raises their error, if any)."""

        ray.get(self._version_calls)
        self._version_calls.clear()
