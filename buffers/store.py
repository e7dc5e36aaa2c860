"""Group payloads through the Ray object store: the buffer actor handles only metadata and ObjectRefs.

    producer:  ref = put_groups(buffer, groups)           # body -> object store once (owned by the buffer actor),
                                                          #   buffer.put_stored(head, [ref]): metas + offsets only
    buffer:    queues (meta, (ref, start, end)) per group and never reads the body on the default path
    trainer:   groups = get_groups(buffer, n, step)       # ObjectRefs back; each body is read in place (zero-copy
                                                          #   view of shared memory) and decoded here

Why: a large `bytes` argument or result of an actor call is written to the object store and copied on both sides of
each hop; through the buffer that is two hops (~1 ms per MB each on a small machine). Here the body is written once
by the producer and read in place by the trainer. The buffer actor *owns* the objects (`ray.put(..., _owner=buffer)`,
marked experimental in Ray 2.52; tests/test_buffer_ray.py pins the behaviour), so a producer that dies takes none of
its queued groups with it; an object is freed once its last group is handed out and the trainer drops the refs.
Paths that need the bytes inside the buffer (save, a user filter, regenerate, `get`/`get_encoded`) read them on the
buffer's node, where the object lives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from buffers.wire import Entry, decode_batch, decode_head, encode_split, join_groups
from streamrl.types import Group

Piece = tuple[Any, int, int]  # (ObjectRef of a uint8 array, start, end): one group's msgpack
_STARTED: set[bytes] = set()  # buffer actors this process has seen answer


class StoreMixin:
    """`put_stored` / `get_stored` for RolloutBuffer (the actor side of this module)."""

    async def put_stored(self, head: bytes, refs: list[Any], timeout: float | None = None) -> int:
        """`put` for groups whose bytes are in the object store: `head` from `encode_split`, `refs` = [ObjectRef of
        the body as a uint8 array] (in a list, so that Ray passes the ref rather than the object)."""
        if len(refs) != 1:
            raise ValueError(f"put_stored takes one body ObjectRef per call, got {len(refs)}")
        # The head is trusted to describe the body (both come from `encode_split`): reading the body to check it
        # would cost what this path saves.
        return await self._put([Entry(m, stored=(refs[0], a, b)) for m, a, b in decode_head(head)], timeout)

    async def get_stored(self, n: int, step: int, timeout: float | None = None) -> list[Piece]:
        """`get`, as one `(ObjectRef, start, end)` per group (read them with `fetch_groups`). Groups that were not
        put through the store are sent in one new object."""
        entries = await self._take(n, step, timeout)
        loose = [e for e in entries if e.stored is None]
        if loose:
            import ray

            raws = [e.raw for e in loose]
            ref = ray.put(np.frombuffer(b"".join(raws), dtype=np.uint8))
            ends = np.cumsum([len(r) for r in raws]).tolist()
            for e, a, b in zip(loose, [0, *ends], ends, strict=False):
                e.stored = (ref, a, b)
        return [e.stored for e in entries]

    async def _materialize(self, entries: list[Entry]) -> list[Entry]:
        """Fetch the bytes of stored entries without blocking the event loop (other paths use a blocking but
        local `ray.get`, about which Ray warns once)."""
        todo = [e for e in entries if e.stored is not None and e._raw is None]
        if todo:
            import asyncio

            views = await asyncio.gather(*(e.stored[0] for e in todo))
            for e, v in zip(todo, views, strict=True):
                e._raw = v[e.stored[1]:e.stored[2]].tobytes()
        return entries


def _started(buffer: Any) -> bool:
    return buffer._actor_id.binary() in _STARTED


def put_groups(buffer: Any, groups: list[Group], timeout: float | None = None) -> Any:
    """Producer side: send `groups` to the buffer actor through the object store; returns the call's ObjectRef
    (its value: how many groups were put). The groups are encoded before it returns: they may be reused at once."""
    import ray

    if not _started(buffer):  # `_owner` on an actor still starting aborts the process (a failed CHECK in Ray)
        ray.get(buffer.size.remote())
        _STARTED.add(buffer._actor_id.binary())
    head, body = encode_split(groups)
    ref = ray.put(np.frombuffer(body, dtype=np.uint8), _owner=buffer)
    return buffer.put_stored.remote(head, [ref], timeout=timeout)


async def put_split(buffer: Any, head: bytes, body: bytearray, timeout: float | None = None) -> int:
    """Asyncio producers: send what `encode_split(groups)` made. The object-store write runs in a thread (Ray copies
    without the GIL), so the event loop can encode the next batch meanwhile; returns how many groups were put."""
    import asyncio

    import ray

    if not _started(buffer):
        await buffer.size.remote()
        _STARTED.add(buffer._actor_id.binary())
    ref = await asyncio.to_thread(ray.put, np.frombuffer(body, dtype=np.uint8), _owner=buffer)
    return await buffer.put_stored.remote(head, [ref], timeout=timeout)


def fetch_groups(pieces: list[Piece], decode: bool = True) -> list[Group] | bytes:
    """Trainer side: the groups of a `get_stored` result (or their msgpack, `decode=False`)."""
    import ray

    refs = list(dict.fromkeys(r for r, _, _ in pieces))  # ObjectRefs hash and compare by object id
    views = dict(zip(refs, ray.get(refs), strict=True))  # zero-copy views of the object store
    data = join_groups([views[r][a:b] for r, a, b in pieces])
    return decode_batch(data) if decode else data


def get_groups(buffer: Any, n: int, step: int, timeout: float | None = None) -> list[Group]:
    """Trainer side: `buffer.get(n, step)` through the object store."""
    import ray

    return fetch_groups(ray.get(buffer.get_stored.remote(n, step, timeout=timeout)))
