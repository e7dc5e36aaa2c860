"""The engine's flat weights and the CUDA IPC copy plan, on CPU tensors (the GPU test runs the real handles).

A trainer's bucket whose layout matches the engine's flat buffer must load as ONE contiguous copy and give
exactly the trainer's weights; any other bucket falls back to per-tensor copies; bad names never write.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamrl.engine.flat import ALIGN_BYTES, aligned, flatten_parameters
from streamrl.models.tiny import tiny_config
from streamrl.weights.layout import IpcBucket, bucket_layout, copy_plan


def _model(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("qwen3", "tiny", vocab_size=88), dtype=torch.float32)


def _pack(named, bucket_bytes, dtype=None):
    """What IpcSender does on the GPU, on CPU tensors and without handles."""
    flats, buckets = [], []
    target = [(t, dtype or t.dtype) for _, t in named]
    for dt, idx, offsets, numel in bucket_layout(target, bucket_bytes):
        flat = torch.full((numel,), float("nan"), dtype=dt)
        for i, off in zip(idx, offsets, strict=True):
            flat[off : off + named[i][1].numel()] = named[i][1].reshape(-1)
        flats.append(flat)
        buckets.append(IpcBucket(handle=[], dtype=str(dt).removeprefix("torch."), numel=numel,
                                 names=[named[i][0] for i in idx], shapes=[list(named[i][1].shape) for i in idx],
                                 offsets=offsets))
    return flats, buckets


def _apply(pairs):
    with torch.no_grad():
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def test_aligned_offsets():
    assert aligned(0, 2) == 0
    assert aligned(1, 2) == ALIGN_BYTES // 2
    assert aligned(ALIGN_BYTES // 4, 4) == ALIGN_BYTES // 4
    assert aligned(ALIGN_BYTES // 4 + 1, 4) == 2 * (ALIGN_BYTES // 4)


def test_flatten_keeps_values_ties_and_parameters():
    m = _model(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params_before = {n: p for n, p in m.named_parameters()}
    index = flatten_parameters(m)
    after = m.state_dict()
    assert set(index) == set(params_before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for n, p in m.named_parameters():
        assert p is params_before[n]  # same Parameter objects, new storage
        s = index[n]
        assert p.data_ptr() == s.flat.data_ptr() + s.offset * p.element_size()
        assert (p.data_ptr() - s.flat.data_ptr()) % ALIGN_BYTES == 0
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied stays tied


@pytest.mark.parametrize("bucket_bytes", [64 * 1024, 1 << 30])
def test_matching_buckets_load_as_one_copy_each(bucket_bytes):
    trainer, engine = _model(1), _model(2)
    index = flatten_parameters(engine)
    named = [(n, p.detach()) for n, p in trainer.named_parameters()]
    flats, buckets = _pack(named, bucket_bytes)
    assert len(buckets) > 1 or bucket_bytes == 1 << 30
    pairs = copy_plan(buckets, flats, index, engine.state_dict())
    assert len(pairs) == len(buckets)  # one contiguous range per bucket
    _apply(pairs)
    want, got = trainer.state_dict(), engine.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_other_layouts_fall_back_to_per_tensor_copies():
    trainer, engine = _model(1), _model(2)
    index = flatten_parameters(engine)
    named = [(n, p.detach()) for n, p in trainer.named_parameters()]
    flats, buckets = _pack(named, 1 << 30, dtype=torch.bfloat16)  # bf16 buckets into an fp32 engine
    pairs = copy_plan(buckets, flats, index, engine.state_dict())
    assert len(pairs) == len(named)
    _apply(pairs)
    for k, v in trainer.state_dict().items():
        assert torch.equal(engine.state_dict()[k], v.to(torch.bfloat16).float()), k
    flats, buckets = _pack(list(reversed(named)), 1 << 30)  # another order: offsets do not match
    assert len(copy_plan(buckets, flats, index, engine.state_dict())) == len(named)


def test_bad_names_and_shapes_are_refused():
    trainer, engine = _model(1), _model(2)
    index = flatten_parameters(engine)
    named = [(n, p.detach()) for n, p in trainer.named_parameters()]
    flats, buckets = _pack([("model.nope.weight", named[0][1])] + named[1:], 1 << 30)
    with pytest.raises(ValueError, match="unknown parameter name 'model.nope.weight'"):
        copy_plan(buckets, flats, index, engine.state_dict())
    flats, buckets = _pack([(named[1][0], named[0][1])], 1 << 30)
    with pytest.raises(ValueError, match="shape"):
        copy_plan(buckets, flats, index, engine.state_dict())
