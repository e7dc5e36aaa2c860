"""KV cache for the continuous-batching scheduler: left-padded batch inputs and a `KVBatch` of per-request K/V rows.

Layout. Each running request owns one row of a left-padded batch cache: per layer, keys and values of shape
[rows, kv_heads, T, head_dim] (transformers' `DynamicLayer` layout), plus a [rows, T] mask that is 1 over the
request's real tokens. A request's own K/V is `keys[layer][row, :, T - n:]`. Keeping the rows stacked between steps,
rather than one tensor per request that is re-padded every step, makes the common decode step (same requests as the
last step) cost no per-request tensor ops: the model appends the new column itself, inside `DynamicLayer.update`.
Rows are re-stacked only when requests join (`merge`) or leave (`retain`).

Invariant: a cached request holds the K/V of all but its newest token, `len(prompt + output) - 1` positions; a decode
step feeds that newest token at its true position and grows the cache by one. Padded slots hold zeros and are
masked, so they never contribute to attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def left_pad(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each [B, max_len]; the last column is every row's newest token and
    positions count real tokens only, so a padded row sees the same positions as it would alone."""
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    return input_ids, mask, positions


def supports_kv_cache(model: torch.nn.Module) -> bool:
    """True when every attention layer is full attention: a sliding-window layer would keep only the last window in
    `DynamicCache`, which our row bookkeeping does not model."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in layer_types)


def _pad_cols(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Left-pad `t` with zeros along `dim` to `width`."""
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _stack(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([_pad_cols(a, width, 2), _pad_cols(b, width, 2)])


DEFAULT_MAX_PREFILL_TOKENS = 16384  # SGLang's --max-prefill-tokens default


def prefill_chunks(rows: Sequence[Any], max_prefill_tokens: int | None) -> list[list[Any]]:
    """Newcomers in prefill batches of at most `max_prefill_tokens` padded tokens (SGLang's --max-prefill-tokens).

    Longest first, so each batch pads to a length close to its rows' own: one padded batch of a 30-token and a
    1000-token sequence costs 2000 tokens, two batches cost 1030. A row longer than the budget gets a batch alone.
    """
    if not max_prefill_tokens:
        return [list(rows)] if rows else []
    def length(r: Any) -> int:
        return len(r.prompt_ids) + len(r.output_ids)

    chunks: list[list[Any]] = []
    for r in sorted(rows, key=length, reverse=True):  # a chunk pads to its first (longest) row's length
        if chunks and (len(chunks[-1]) + 1) * length(chunks[-1][0]) <= max_prefill_tokens:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


def no_phase(phase: str) -> None:
    pass


class KVBatch:
    """Left-padded K/V of a set of requests (`rows`: any objects, matched by identity, in row order); one thread."""

    def __init__(self, max_prefill_tokens: int | None = None) -> None:
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_rows = 0  # requests prefilled so far (a counter for the engine's stats)
        self.on_phase: Callable[[str], None] = no_phase  # the scheduler's timer marks "decode" / "prefill"
        self.clear()

    def clear(self) -> None:
        self.rows: list[Any] = []
        self.keys: list[torch.Tensor] = []  # per layer [rows, kv_heads, T, head_dim]
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [rows, T], 1 over real tokens

    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # memory given back while the engine is released (memory.py): this cache grows per batch, no graphs
    def drop_graphs(self) -> None:
        pass

    def release(self) -> None:
        self.clear()

    def resume(self) -> None:
        pass

    # ---- one iteration ---------------------------------------------------------------------------------------
    def step(self, batch: Sequence[Any], forward: Callable[..., torch.Tensor]) -> tuple[list[Any], torch.Tensor]:
        """Decode the rows of `batch` that have a cache and prefill the others: at most two forwards.

        `batch` items need `prompt_ids` and `output_ids`; rows that left the batch are dropped first.
        `forward(input_ids, attention_mask, position_ids, cache)` runs the model and returns next-token logits [B, V].
        Returns (requests in logits order, logits); afterwards every returned request has a cache row.
        """
        self.retain(batch)
        cached = {id(r) for r in self.rows}
        fresh = [r for r in batch if id(r) not in cached]
        rows = list(self.rows)
        parts = []
        if rows:
            cache, mask = self.decode_inputs()
            ids = torch.tensor([[r.output_ids[-1]] for r in rows], dtype=torch.long)
            # The newest token's true position: a row's left padding is invisible to RoPE.
            pos = torch.tensor([[len(r.prompt_ids) + len(r.output_ids) - 1] for r in rows], dtype=torch.long)
            parts.append(forward(ids, mask, pos, cache))
            self.after_decode(cache, mask)
            self.on_phase("decode")
        for chunk in prefill_chunks(fresh, self.max_prefill_tokens):
            ids, mask, pos = left_pad([r.prompt_ids + r.output_ids for r in chunk])
            cache = DynamicCache()
            parts.append(forward(ids, mask, pos, cache))
            self.merge(KVBatch.from_prefill(chunk, cache, mask))
            rows += chunk
        if fresh:
            self.prefill_rows += len(fresh)
            self.on_phase("prefill")
        return rows, torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---- forwards --------------------------------------------------------------------------------------------
    @staticmethod
    def from_prefill(rows: list[Any], cache: DynamicCache, mask: torch.Tensor) -> KVBatch:
        """Take over the cache a prefill forward filled (`mask` is that forward's attention mask)."""
        kv = KVBatch()
        kv.rows = list(rows)
        kv.mask = mask.to(cache.layers[0].keys.device)
        pad = ~kv.mask.bool()[:, None, :, None]
        for layer in cache.layers:
            # Padded query slots of a prefill produce finite junk K/V; zero it so no NaN/inf can ever leak through
            # a masked (weight 0) slot.
            kv.keys.append(layer.keys.masked_fill(pad, 0.0))
            kv.values.append(layer.values.masked_fill(pad, 0.0))
        return kv

    def decode_inputs(self) -> tuple[DynamicCache, torch.Tensor]:
        """A DynamicCache viewing the rows (no copy) and the [rows, T + 1] attention mask for a one-token step."""
        cache = DynamicCache()
        for k, v in zip(self.keys, self.values, strict=True):
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        assert self.mask is not None
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        return cache, mask

    def after_decode(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Adopt the grown cache of a decode step (`decode_inputs`' cache and mask, after the forward)."""
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.mask = mask

    # ---- membership ------------------------------------------------------------------------------------------
    def retain(self, keep: Iterable[Any]) -> None:
        """Drop every row not in `keep` (frees finished/aborted requests) and trim all-padding leading columns."""
        keep_ids = {id(r) for r in keep}
        idx = [i for i, r in enumerate(self.rows) if id(r) in keep_ids]
        if len(idx) == len(self.rows):
            return
        if not idx:
            self.clear()
            return
        assert self.mask is not None
        sel = torch.tensor(idx, device=self.mask.device)
        mask = self.mask.index_select(0, sel)
        start = int(mask.any(0).long().argmax())  # first column some kept row still uses
        self.rows = [self.rows[i] for i in idx]
        self.mask = mask[:, start:]
        self.keys = [k.index_select(0, sel)[:, :, start:] for k in self.keys]
        self.values = [v.index_select(0, sel)[:, :, start:] for v in self.values]

    def merge(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours, left-padding whichever is shorter."""
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.keys, self.values, self.mask = other.rows, other.keys, other.values, other.mask
            return
        assert self.mask is not None and other.mask is not None
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.rows = self.rows + other.rows
        self.mask = torch.cat([_pad_cols(self.mask, width, 1), _pad_cols(other.mask, width, 1)], dim=0)
        self.keys = [_stack(a, b, width) for a, b in zip(self.keys, other.keys, strict=True)]
        self.values = [_stack(a, b, width) for a, b in zip(self.values, other.values, strict=True)]

    def row_kv(self, row: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's own (unpadded) keys and values for one layer, [kv_heads, n, head_dim] each (for tests)."""
        assert self.mask is not None
        i = next(i for i, r in enumerate(self.rows) if r is row)
        n = int(self.mask[i].sum())
        width = self.mask.shape[1]
        return self.keys[layer][i, :, width - n :], self.values[layer][i, :, width - n :]
