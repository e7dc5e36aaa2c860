"""Fault injection for e2e tests: signal an engine's process once the job has logged a given train step."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def signal_after_step(metrics: Path, step: int, box: dict, sig: int) -> Iterator[threading.Event]:
    """While the block runs, send `sig` to the pid in `box["pid"]` once `metrics` (metrics.jsonl) holds train step
    `step`; yields an event that is set when the signal went out."""
    done, stop = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):  # polling a condition: the metrics file
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            if any(json.loads(x).get("step", 0) >= step and "reward" in x for x in rows):
                os.kill(box["pid"], sig)
                done.set()
                return

    t = threading.Thread(target=watch)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join()
