"""HF <-> Megatron conversion (streamrl/train/megatron/convert.py): exact round trips, TP shards, and with
megatron-core on CPU the same logits as the HF model (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamrl.models.tiny import tiny_config
from streamrl.train.megatron.convert import (
    arch_from_hf,
    fuse_qkv,
    hf_to_megatron,
    megatron_to_hf,
    padded_vocab,
    split_qkv,
    tp_gather,
    tp_shard,
)


def hf_model(arch: str, tied: bool, seed: int = 0):
    cfg = tiny_config(arch, vocab_size=88)
    cfg.tie_word_embeddings = tied
    cfg.pad_token_id = 0  # as build_tiny_model: the in-repo tokenizer's pad id (HF's embedding padding_idx)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_padded_vocab():
    assert padded_vocab(88, 128, 1) == 128 and padded_vocab(88, 128, 2) == 256 and padded_vocab(256, 128, 2) == 256
    assert padded_vocab(151936, 128, 1) == 151936


def test_qkv_layout_is_per_query_group():
    """Group g holds its Q/G query heads, then its key head, then its value head (hand-built rows)."""
    cfg = tiny_config("qwen3", vocab_size=88)  # 4 heads, 2 groups, D = 32
    a = arch_from_hf(cfg)
    d, h = 32, 1
    q = torch.arange(4 * d, dtype=torch.float32).view(-1, h)
    k = 1000 + torch.arange(2 * d, dtype=torch.float32).view(-1, h)
    v = 2000 + torch.arange(2 * d, dtype=torch.float32).view(-1, h)
    qkv = fuse_qkv(q, k, v, a).view(2, 4, d)  # [groups, q, q, k, v]
    assert torch.equal(qkv[1, 0], q.view(4, d)[2]) and torch.equal(qkv[1, 1], q.view(4, d)[3])
    assert torch.equal(qkv[1, 2], k.view(2, d)[1]) and torch.equal(qkv[0, 3], v.view(2, d)[0])
    assert all(torch.equal(x, y) for x, y in zip(split_qkv(qkv.view(-1, h), a), (q, k, v), strict=True))


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("qwen3", False), ("llama", True), ("llama", False)])
def test_round_trip_is_exact(arch, tied):
    model = hf_model(arch, tied)
    hf = model.state_dict()
    a = arch_from_hf(model.config)
    mg = hf_to_megatron(hf, a)
    assert mg["embedding.word_embeddings.weight"].shape[0] == 128 and ("output_layer.weight" in mg) == (not tied)
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in mg) == (arch == "qwen3")
    back = megatron_to_hf(mg, a)
    expect = {k: v for k, v in hf.items() if not (tied and k == "lm_head.weight")}
    assert back.keys() == expect.keys()
    assert all(torch.equal(back[k], expect[k]) for k in expect)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_gather_back_exactly(tp):
    model = hf_model("qwen3", tied=False)
    a = arch_from_hf(model.config, tp=tp)
    mg = hf_to_megatron(model.state_dict(), a)
    for name, t in mg.items():
        shards = [tp_shard(name, t, r, tp) for r in range(tp)]
        assert torch.equal(tp_gather(name, shards), t), name
    # linear_fc1: rank r holds its own columns of gate AND up (SwiGLU pairs them within a rank)
    fc1 = mg["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = fc1.chunk(2)
    r1 = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, tp)
    assert torch.equal(r1, torch.cat([gate.chunk(tp)[1], up.chunk(tp)[1]]))
    # linear_qkv: rank r holds whole query groups (2 groups: with tp=2 one group each)
    qkv = mg["decoder.layers.0.self_attention.linear_qkv.weight"]
    if tp == 2:
        assert torch.equal(tp_shard("x.linear_qkv.weight", qkv, 1, 2), qkv.view(2, -1, 128)[1])
