"""Rollout buffer: the bounded, versioned queue between producers and the trainer, its ledger, pacing, filters,
replay, persistence and the msgpack wire format of its fast path."""

from buffers.admission import admission_limit, groups_per_step, may_admit
from buffers.filters import (
    BUILTIN_FILTERS,
    fifo,
    freshest_first,
    lifo,
    load_buffer_filter,
    oldest_version_first,
    pop_first,
    prioritized,
    priority_scores,
)
from buffers.ledger import STATES, Ledger, LedgerError
from buffers.queue import BufferClosed, RolloutBuffer, make_buffer_actor
from buffers.replay import ReplayStore
from streamrl.wire import GroupMeta, decode_batch, encode_batch, meta_of

__all__ = [
    "BUILTIN_FILTERS",
    "STATES",
    "BufferClosed",
    "GroupMeta",
    "Ledger",
    "LedgerError",
    "ReplayStore",
    "RolloutBuffer",
    "admission_limit",
    "decode_batch",
    "encode_batch",
    "fifo",
    "freshest_first",
    "groups_per_step",
    "lifo",
    "load_buffer_filter",
    "make_buffer_actor",
    "may_admit",
    "meta_of",
    "oldest_version_first",
    "pop_first",
    "prioritized",
    "priority_scores",
]
