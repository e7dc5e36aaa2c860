"""HF <-> Megatron-core state dicts for the Qwen3 and Llama families (pure functions over tensors, no megatron import).

Megatron's local layer spec names and layouts (what `GPTModel` with `get_gpt_layer_local_spec` holds):

    embedding.word_embeddings.weight              [Vp, H]   HF model.embed_tokens, rows padded to Vp
    decoder.layers.i.input_layernorm.weight       [H]
    decoder.layers.i.self_attention.linear_qkv    [G*(Q/G+2)*D, H]  per query group g: its Q/G query heads, then
                                                            its key head, then its value head (q_proj/k_proj/v_proj)
    decoder.layers.i.self_attention.q_layernorm   [D]       Qwen3's q_norm / k_norm (per head)
    decoder.layers.i.self_attention.linear_proj   [H, Q*D]  o_proj
    decoder.layers.i.pre_mlp_layernorm.weight     [H]       post_attention_layernorm
    decoder.layers.i.mlp.linear_fc1.weight        [2F, H]   cat(gate_proj, up_proj) (SwiGLU: silu(first) * second)
    decoder.layers.i.mlp.linear_fc2.weight        [H, F]    down_proj
    decoder.final_layernorm.weight                [H]       model.norm
    output_layer.weight                           [Vp, H]   lm_head (untied only), rows padded to Vp

Tensor parallelism (`tp_shard` / `tp_gather`): column-parallel weights (linear_qkv, linear_fc1, the vocabulary of
embedding and output layer) split their rows, row-parallel ones (linear_proj, linear_fc2) their columns. The QKV
layout keeps whole query groups on one rank, so a plain row split is right for it; linear_fc1 is split as gate and
up separately (rank r holds cat(gate_r, up_r)), as Megatron's SwiGLU needs both halves of its own columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Arch:
    """The shape facts the conversion needs (from the HF config, or from Megatron's flags)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head dim D
    vocab_size: int  # the tokenizer's / HF model's V
    padded_vocab_size: int  # Vp >= V (--make-vocab-size-divisible-by x TP)
    tied: bool  # embeddings and output layer share one matrix (no --untie-embeddings-and-output-weights)
    qk_layernorm: bool


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's vocabulary padding: the smallest multiple of divisible_by x TP that holds vocab_size."""
    m = divisible_by * tp
    return -(-vocab_size // m) * m


def arch_from_hf(cfg: Any, divisible_by: int = 128, tp: int = 1) -> Arch:
    """The Arch of an HF Qwen3 / Llama config."""
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("HF checkpoint has linear biases: the Megatron backend converts bias-free Qwen3/Llama only")
    heads = cfg.num_attention_heads
    return Arch(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=heads,
        num_query_groups=cfg.num_key_value_heads or heads,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab_size=cfg.vocab_size,
        padded_vocab_size=padded_vocab(cfg.vocab_size, divisible_by, tp), tied=bool(cfg.tie_word_embeddings),
        qk_layernorm=cfg.model_type.startswith("qwen3"),
    )


def _pad_rows(w: Tensor, rows: int) -> Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, a: Arch) -> Tensor:
    """q_proj [Q*D, H], k_proj/v_proj [G*D, H] -> linear_qkv [G*(Q/G+2)*D, H] in per-group order."""
    g, d = a.num_query_groups, a.kv_channels
    h = q.shape[-1]
    qg = q.view(g, a.num_attention_heads // g * d, h)
    return torch.cat([qg, k.view(g, d, h), v.view(g, d, h)], dim=1).reshape(-1, h)


def split_qkv(qkv: Tensor, a: Arch) -> tuple[Tensor, Tensor, Tensor]:
    g, d = a.num_query_groups, a.kv_channels
    h = qkv.shape[-1]
    per = a.num_attention_heads // g * d
    q, k, v = qkv.view(g, per + 2 * d, h).split([per, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


_LAYER = {  # Megatron suffix -> HF suffix, for the one-to-one tensors of a decoder layer
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def hf_to_megatron(hf: dict[str, Tensor], a: Arch) -> dict[str, Tensor]:
    """A full HF state dict -> the full Megatron state dict (vocabulary padded to a.padded_vocab_size)."""
    out = {"embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], a.padded_vocab_size),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not a.tied:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], a.padded_vocab_size)
    for i in range(a.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for m, h in _LAYER.items():
            if "layernorm" in m and m.startswith("self_attention") and not a.qk_layernorm:
                continue
            out[dst + m] = hf[src + h]
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], a)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"],
                                                        hf[src + "mlp.up_proj.weight"]])
    return out


def megatron_to_hf_tensor(name: str, t: Tensor, a: Arch) -> list[tuple[str, Tensor]]:
    """One full Megatron tensor -> its HF tensors (vocabulary padding removed). Per tensor, so that weight sync
    can convert while it gathers, bucket by bucket."""
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", t[: a.vocab_size])]
    if name == "output_layer.weight":
        return [("lm_head.weight", t[: a.vocab_size])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", t)]
    if not name.startswith("decoder.layers."):
        raise KeyError(f"no HF name for Megatron tensor {name!r}")
    i, suffix = name[len("decoder.layers."):].split(".", 1)
    pre = f"model.layers.{i}."
    if suffix == "self_attention.linear_qkv.weight":
        q, k, v = split_qkv(t, a)
        return [(pre + "self_attn.q_proj.weight", q), (pre + "self_attn.k_proj.weight", k),
                (pre + "self_attn.v_proj.weight", v)]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = t.chunk(2)
        return [(pre + "mlp.gate_proj.weight", gate), (pre + "mlp.up_proj.weight", up)]
    return [(pre + _LAYER[suffix], t)]


def megatron_to_hf(mg: dict[str, Tensor], a: Arch) -> dict[str, Tensor]:
    return {k: v for name, t in mg.items() for k, v in megatron_to_hf_tensor(name, t, a)}


# ---------------------------------------------------------------------------------------------- tensor parallel
_COLUMN = ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def tp_dim(name: str) -> int | None:
    """The dimension a Megatron tensor is split along under TP (None: replicated, e.g. the norms)."""
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def tp_shard(name: str, t: Tensor, rank: int, size: int) -> Tensor:
    """Rank `rank`'s part of the full Megatron tensor `t` under TP size `size`."""
    dim = tp_dim(name)
    if dim is None or size == 1:
        return t
    if name.endswith("linear_fc1.weight"):
        return torch.cat([half.chunk(size)[rank] for half in t.chunk(2)])
    return t.chunk(size, dim=dim)[rank].contiguous()


def tp_gather(name: str, shards: list[Tensor]) -> Tensor:
    """The full tensor from every TP rank's shard (inverse of tp_shard)."""
    dim = tp_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=dim)
