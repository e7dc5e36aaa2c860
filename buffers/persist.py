"""Buffer persistence: what a checkpoint holds and how it reaches the disk (msgpack, atomic write).

`save(path)` writes `state_dict()` as one msgpack file: queued groups (including those held by a get in progress),
partial groups stashed by producers, the regenerate list, the replay store, the ledger, the version, the metrics
and the buffer filter's state (if it has any: the built-in filters keep none). The write is atomic (a temp file in
the same directory, fsync, rename), so a crash leaves either the old checkpoint or the new one, never half of one.
A round trip restores identical `get` results.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import msgspec

FORMAT = 2  # 1: the first buffer's state_dict (no replay/partials/filter); still loadable


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    atomic_write(path, msgspec.msgpack.encode({**state, "format": FORMAT}))


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    state = msgspec.msgpack.decode(Path(path).read_bytes())
    if not isinstance(state, dict) or "ledger" not in state:
        raise ValueError(f"{path} is not a rollout buffer checkpoint")
    if state.get("format", 1) > FORMAT:
        raise ValueError(f"{path} has buffer format {state['format']}; this streamrl reads up to {FORMAT}")
    return state
