"""Preallocated slot KV cache with CUDA-graph decode steps, for Qwen3/Llama-style HF models (the GPU fast path).

Same interface as `kv.KVBatch` (`step`, `retain`, `clear`), so the Scheduler's continuous batching is unchanged.

Layout: per layer, K and V are [slots, max_len, kv_heads, head_dim], allocated once. Running requests occupy slots
0..n-1 in order (compacted: when a request leaves, the last slot's rows move into its place), so a decode step
attends over the prefix view `cache[:bucket, :len_bucket]` without gathering. The decode step (embedding ->
layers -> norm -> lm_head) for each (batch bucket, length bucket) pair is captured once as a CUDA graph and
replayed with its static inputs (tokens, positions) refreshed in place: a step costs one graph launch instead of
~15 kernel launches per layer.

Decode attention: on CUDA in bf16/fp16, FlashAttention's varlen kernel with `seqused_k` reads only each slot's own
cached tokens (the slot cache seen as `slots` sequences of `max_len` rows, of which the first `len` are used), so a
step costs the batch's real tokens, not batch x longest. A batch with one long sample then no longer makes every
row read the long width; and one graph per batch bucket serves every length. Elsewhere (CPU, fp32) a masked SDPA
over the length bucket does the same maths.

Prefill of newcomers is an eager right-padded forward that writes their K/V into their slots, in batches of at most
`max_prefill_tokens` padded tokens, longest first (kv.prefill_chunks), so a batch pads to about its own lengths. On
CPU the same code runs eagerly (tests compare it with the HF path token for token).

Weights are the HF model's own parameters: weight updates copy into them in place, so captured graphs stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .kv import no_phase, prefill_chunks

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
LEN_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192)


def supports_static_kv(model: torch.nn.Module) -> bool:
    """Qwen3/Llama/Qwen2/Mistral-style decoders: full attention, rotary, gated MLP, no sliding windows."""
    cfg = model.config
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return cfg.model_type in ("qwen3", "llama", "qwen2", "mistral") and types == {"full_attention"} and not getattr(
        cfg, "sliding_window", None
    )


def round_up_to_bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def _flash_varlen(q, k, v, cu_q, cu_k, max_k: int, used_k):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, max_k, 0.0, False, False,
                                                   seqused_k=used_k)[0]


_FLASH_OK: dict[str, bool] = {}


def _flash_works(p: torch.Tensor) -> bool:
    """Whether this torch build's FlashAttention runs varlen decode with `seqused_k` here (else: masked SDPA)."""
    key = f"{p.device}/{p.dtype}"
    if key not in _FLASH_OK:
        try:
            q = torch.zeros(2, 4, 64, device=p.device, dtype=p.dtype)
            kv = torch.zeros(2 * 16, 2, 64, device=p.device, dtype=p.dtype)
            cu = torch.arange(3, device=p.device, dtype=torch.int32)
            _flash_varlen(q, kv, kv, cu, cu * 16, 16, cu[1:])
            _FLASH_OK[key] = True
        except (RuntimeError, NotImplementedError):
            _FLASH_OK[key] = False
    return _FLASH_OK[key]


class StaticKV:
    def __init__(self, model: torch.nn.Module, slots: int, max_len: int, use_graphs: bool | None = None,
                 decode_attention: str = "auto", max_prefill_tokens: int | None = None):
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_rows = 0  # requests prefilled so far (a counter for the engine's stats)
        self.on_phase: Any = no_phase  # the scheduler's timer marks "decode" / "prefill"
        self.model, self.inner = model, model.model
        cfg = model.config
        self.layers = list(self.inner.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.slots, self.max_len = slots, round_up_to_bucket(max_len, LEN_BUCKETS)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (slots, self.max_len, self.n_kv, self.head_dim)
        # K and V of every layer in one tensor (per-layer views below): slot compaction then moves the rows of all
        # layers in one gather and one scatter, not 2 x layers copies per moved row
        self.kv = torch.zeros((2 * len(self.layers), *shape), device=self.device, dtype=self.dtype)
        self.k = [self.kv[2 * i] for i in range(len(self.layers))]
        self.v = [self.kv[2 * i + 1] for i in range(len(self.layers))]
        self.rows: list[Any] = []  # request in slot i
        self.lens: list[int] = []  # tokens cached in slot i
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._tok = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._pool = None
        if decode_attention not in ("auto", "flash", "sdpa"):
            raise ValueError(f"decode_attention must be auto, flash or sdpa, got {decode_attention!r}")
        flash_ok = self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        if decode_attention == "flash" and not flash_ok:
            raise ValueError("decode_attention='flash' needs a CUDA model in bf16 or fp16")
        self.flash = flash_ok and decode_attention != "sdpa" and (decode_attention == "flash" or _flash_works(p))

    # ---- bookkeeping (same contract as KVBatch) ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def clear(self) -> None:
        self.rows, self.lens = [], []

    # ---- memory given back while the engine is released (memory.py) --------------------------------------------
    def drop_graphs(self) -> None:
        """Forget the captured decode graphs (captured again when next needed): they hold the weights' and the
        cache's addresses, which a release changes."""
        self._graphs.clear()
        self._pool = None

    def release(self) -> None:
        """Give the slot cache's memory back (no request may hold a slot); the per-layer views stay."""
        self.clear()
        self.kv.untyped_storage().resize_(0)

    def resume(self) -> None:
        self.kv.untyped_storage().resize_(self.kv.numel() * self.kv.element_size())
        self.kv.zero_()

    def retain(self, keep: Iterable[Any]) -> None:
        """Free the slots of requests not in `keep`, moving the last slots into the holes (stay compacted)."""
        keep_ids = {id(r) for r in keep}
        rows, lens, src = self.rows, self.lens, list(range(len(self.rows)))  # src: the slot each row's K/V is in
        i = 0
        while i < len(rows):
            if id(rows[i]) in keep_ids:
                i += 1
                continue
            last = len(rows) - 1
            if i != last:
                rows[i], lens[i], src[i] = rows[last], lens[last], src[last]
            rows.pop()
            lens.pop()
            src.pop()
        moves = [(dst, s) for dst, s in enumerate(src) if s != dst]
        if moves:  # every layer's K and V at once; the gather reads all sources before the scatter writes
            width = max(lens[dst] for dst, _ in moves)
            dst_idx = torch.tensor([d for d, _ in moves], device=self.device)
            src_idx = torch.tensor([s for _, s in moves], device=self.device)
            self.kv[:, dst_idx, :width] = self.kv[:, src_idx, :width]

    # ---- one scheduler iteration ----------------------------------------------------------------------------
    def step(self, batch: Sequence[Any], forward: Any = None) -> tuple[list[Any], torch.Tensor]:
        """Next-token logits for every request of `batch`: decode the cached ones, prefill the newcomers."""
        self.retain(batch)
        cached = {id(r) for r in self.rows}
        fresh = [r for r in batch if id(r) not in cached]
        parts, rows = [], []
        if self.rows:
            rows = list(self.rows)
            parts.append(self._decode([r.output_ids[-1] for r in rows]))
            self.on_phase("decode")
        if fresh:
            if len(self.rows) + len(fresh) > self.slots:
                raise RuntimeError(f"KV cache has {self.slots} slots; raise it or lower max_running_requests")
            for chunk in prefill_chunks(fresh, self.max_prefill_tokens):
                parts.append(self._prefill(chunk))
                rows += chunk
            self.prefill_rows += len(fresh)
            self.on_phase("prefill")
        return rows, torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---- forwards -------------------------------------------------------------------------------------------
    @staticmethod
    def _norm(module, x: torch.Tensor) -> torch.Tensor:
        """The HF RMSNorm as one fused kernel (HF's module runs ~6 elementwise kernels)."""
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)

    def _attn_qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B,H,T,D], k/v [B,T,KV,D] for hidden h [B,T,C]; rotary cos/sin [B,T,D] computed once per forward."""

        attn = layer.self_attn
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(b, t, self.n_kv, self.head_dim)
        v = attn.v_proj(h).view(b, t, self.n_kv, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3's per-head RMSNorm
            q, k = self._norm(attn.q_norm, q), self._norm(attn.k_norm, k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k.transpose(1, 2), v

    def _mlp_out(self, layer, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = h + layer.self_attn.o_proj(attn_out)
        return h + layer.mlp(self._norm(layer.post_attention_layernorm, h))

    def _decode_eager(self, n: int, width: int) -> torch.Tensor:
        """One token for slots [0, n) from the static inputs `_tok`/`_pos`; attends over [0, width) columns."""
        tok, pos = self._tok[:n], self._pos[:n]
        h = self.inner.embed_tokens(tok).unsqueeze(1)
        if self.flash:  # varlen: slot i is sequence i of max_len rows, of which pos[i] + 1 are used
            used_k = (pos + 1).to(torch.int32)
        else:
            cols = torch.arange(width, device=self.device)
            mask = (cols.unsqueeze(0) <= pos.unsqueeze(1))[:, None, None, :]  # [n,1,1,width]
        rows = torch.arange(n, device=self.device)
        cos, sin = self.inner.rotary_emb(h, pos.unsqueeze(1))
        for li, layer in enumerate(self.layers):
            x = self._norm(layer.input_layernorm, h)
            q, k, v = self._attn_qkv(layer, x, cos, sin)
            self.k[li][rows, pos] = k[:, 0]
            self.v[li][rows, pos] = v[:, 0]
            if self.flash:
                o = self._flash_decode(li, q[:, :, 0], n, used_k)
            else:
                kk = self.k[li][:n, :width].transpose(1, 2)
                vv = self.v[li][:n, :width].transpose(1, 2)
                # GQA decode: the G query heads sharing a KV head act as G query rows of that head, so the masked
                # kernel runs without expanding K/V (query head h uses KV head h // G, as HF's repeat_kv).
                qg = q.reshape(n, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
                o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask)
            h = self._mlp_out(layer, h, o.reshape(n, 1, -1))
        return self.model.lm_head(self._norm(self.inner.norm, h))[:, 0].float()

    def _flash_decode(self, li: int, q: torch.Tensor, n: int, used_k: torch.Tensor) -> torch.Tensor:
        """Attention of one query per slot [n, H, D] over each slot's first `used_k` cached rows (GQA native)."""
        k = self.k[li][:n].view(n * self.max_len, self.n_kv, self.head_dim)  # slots are contiguous: a view
        v = self.v[li][:n].view(n * self.max_len, self.n_kv, self.head_dim)
        cu_q = torch.arange(n + 1, device=self.device, dtype=torch.int32)
        return _flash_varlen(q.contiguous(), k, v, cu_q, cu_q * self.max_len, self.max_len, used_k)  # [n, H, D]

    def _decode(self, last_tokens: list[int]) -> torch.Tensor:
        n = len(last_tokens)
        positions = list(self.lens)
        if max(positions) >= self.max_len:
            raise RuntimeError(f"sequence reached the KV cache length {self.max_len}")
        bucket = round_up_to_bucket(n, [b for b in BATCH_BUCKETS if b <= self.slots] + [self.slots])
        # flash reads each slot's own length: one graph per batch bucket serves every length
        width = self.max_len if self.flash else round_up_to_bucket(max(positions) + 1,
                                                        [w for w in LEN_BUCKETS if w <= self.max_len])
        self._tok[:bucket].zero_()
        self._pos[:bucket].zero_()
        self._tok[:n].copy_(torch.tensor(last_tokens), non_blocking=True)
        self._pos[:n].copy_(torch.tensor(positions), non_blocking=True)
        if self.use_graphs:
            logits = self._replay(bucket, width)[:n]
        else:
            logits = self._decode_eager(bucket, width)[:n]
        self.lens = [x + 1 for x in self.lens]
        return logits

    def _replay(self, bucket: int, width: int) -> torch.Tensor:
        key = (bucket, width)
        if key not in self._graphs:  # capture lazily: only the shapes a run actually meets
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels/autotuning outside the graph
                    self._decode_eager(bucket, width)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._decode_eager(bucket, width)
            self._pool = graph.pool()
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _prefill(self, fresh: list[Any]) -> torch.Tensor:
        """One right-padded causal forward over the newcomers' full sequences; writes their K/V into new slots."""
        seqs = [r.prompt_ids + r.output_ids for r in fresh]
        lens = [len(s) for s in seqs]
        if max(lens) >= self.max_len:
            raise RuntimeError(f"prompt of {max(lens)} tokens does not fit the KV cache length {self.max_len}")
        b, t = len(seqs), max(lens)
        ids = torch.zeros((b, t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        ids = ids.to(self.device)
        pos = torch.arange(t, device=self.device).unsqueeze(0).expand(b, t)
        first = len(self.rows)
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, pos)
        for li, layer in enumerate(self.layers):
            x = self._norm(layer.input_layernorm, h)
            q, k, v = self._attn_qkv(layer, x, cos, sin)
            self.k[li][first : first + b, :t] = k
            self.v[li][first : first + b, :t] = v
            # Right padding + causal: a real token never sees a pad, so no extra mask is needed.
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               enable_gqa=self.n_kv != self.n_heads)
            h = self._mlp_out(layer, h, o.transpose(1, 2).reshape(b, t, -1))
        last = torch.tensor([n - 1 for n in lens], device=self.device)
        h = h[torch.arange(b, device=self.device), last]
        self.rows += list(fresh)
        self.lens += lens
        return self.model.lm_head(self._norm(self.inner.norm, h)).float()
