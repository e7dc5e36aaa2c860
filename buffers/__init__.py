"""Rollout buffer: the bounded, versioned queue between producers and the trainer, its ledger, pacing and filters."""

from buffers.admission import admission_limit, groups_per_step, may_admit
from buffers.filters import BUILTIN_FILTERS, freshest_first, load_buffer_filter, oldest_version_first, pop_first
from buffers.ledger import STATES, Ledger, LedgerError
from buffers.queue import BufferClosed, RolloutBuffer, make_buffer_actor

__all__ = [
    "BUILTIN_FILTERS",
    "STATES",
    "BufferClosed",
    "Ledger",
    "LedgerError",
    "RolloutBuffer",
    "admission_limit",
    "freshest_first",
    "groups_per_step",
    "load_buffer_filter",
    "make_buffer_actor",
    "may_admit",
    "oldest_version_first",
    "pop_first",
]
