"""`--attn-implementation varlen`: causal attention over a packed stream through FlashAttention's varlen kernel.

Registered with transformers' attention interface under the name "varlen", so an HF Qwen3/Llama runs it in place of
sdpa. The packed forward (packed.py) passes the sample boundaries as `cu_seq_lens_q` / `max_length_q`; each query
then attends to the earlier keys of its own sample only, and nothing is computed across samples or for padding.
The kernel is `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 inside torch: CUDA, bf16/fp16); elsewhere
(CPU, fp32) the same layout goes through SDPA one sample at a time, which is exact and lets CPU tests cover the
reshapes. varlen_attn's keywords moved between torch releases (is_causal, then window_size, then enable_gqa), so
the call is built from its signature.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "varlen"
_PARAMS = inspect.signature(varlen_attn).parameters
_CAUSAL = {"is_causal": True} if "is_causal" in _PARAMS else {"window_size": (-1, 0)}
_NATIVE_GQA = "enable_gqa" in _PARAMS


def _per_sample_sdpa(q: Tensor, k: Tensor, v: Tensor, cu: list[int], scale: float | None) -> Tensor:
    """[N, H, D] streams -> [N, H, D], causal SDPA within each sample (the reference path)."""
    out = []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                             enable_gqa=ks.shape[1] != qs.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int,
                            scale: float | None = None) -> Tensor:
    """Causal attention within each sample of a packed stream: q [N, H, D], k/v [N, Hkv, D] -> [N, H, D].
    FlashAttention's varlen kernel on CUDA in bf16/fp16, SDPA one sample at a time elsewhere (the HF models'
    "varlen" attention and the Megatron backend's --qkv-format thd both run it)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if not _NATIVE_GQA and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = {"enable_gqa": True} if _NATIVE_GQA else {}
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return varlen_attn(q, k, v, cu, cu, int(max_len), int(max_len), scale=scale, **_CAUSAL, **gqa)
    return _per_sample_sdpa(q, k, v, cu_seqlens.tolist(), scale)


def varlen_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: Tensor | None = None, max_length_q: int | None = None, **kwargs
                             ) -> tuple[Tensor, None]:
    """transformers' attention signature: query [1, H, N, D], key/value [1, Hkv, N, D] -> ([1, N, H, D], None)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("--attn-implementation varlen runs packed streams only: add --qkv-format thd")
    if dropout:
        raise ValueError("--attn-implementation varlen has no attention dropout")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, H, D]
    return packed_causal_attention(q, k, v, cu_seq_lens_q, max_length_q, scaling).unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    return None  # the boundaries travel as cu_seqlens, not as a mask


def register_varlen_attention() -> None:
    """Make "varlen" a valid `attn_implementation` for HF models (idempotent)."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
