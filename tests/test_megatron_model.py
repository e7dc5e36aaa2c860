"""Megatron-core on CPU (gloo, world size 1): the GPTModel built from the HF config, loaded through the conversion,
gives the HF model's logits (fp32, 1e-5) and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from streamrl.config import default_args  # noqa: E402
from streamrl.train.megatron.convert import megatron_to_hf_tensor  # noqa: E402
from streamrl.train.megatron.model import HFLikeModel, build_gpt, load_hf_state  # noqa: E402
from tests.test_megatron_convert import hf_model  # noqa: E402


@pytest.fixture(scope="module")
def megatron_world(tmp_path_factory):
    from streamrl.train.megatron.parallel import single_process_world

    with single_process_world(str(tmp_path_factory.mktemp("dist") / "store")):
        yield


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("qwen3", False), ("llama", False)])
def test_same_logits_as_hf(megatron_world, arch, tied):
    hf = hf_model(arch, tied, seed=3)
    args = default_args(train_backend="megatron", hf_checkpoint="tiny")
    gpt, a = build_gpt(args, hf.config, torch.device("cpu"))
    load_hf_state(gpt, hf.state_dict(), a, 0, 1)
    model = HFLikeModel(gpt, a, padding_idx=hf.config.pad_token_id).eval()
    ids = torch.randint(0, 88, (3, 17), generator=torch.Generator().manual_seed(0))
    ids[:, 3] = hf.config.pad_token_id  # the pad token as an input: HF's padding_idx row gets no lookup gradient
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert got.shape == want.shape == (3, 17, 88)
    assert (got - want).abs().max().item() < 1e-5
    w = torch.randn(3, 17, 88, generator=torch.Generator().manual_seed(1))
    (hf(input_ids=ids).logits * w).sum().backward()
    (model(input_ids=ids) * w).sum().backward()
    want_g = {n: p.grad for n, p in hf.named_parameters()}
    for name, p in gpt.named_parameters():
        for hf_name, g in megatron_to_hf_tensor(name, p.grad, a):
            assert torch.allclose(g, want_g[hf_name], rtol=1e-4, atol=1e-4), hf_name  # sums of ~20: fp32 noise



def test_packed_stream_equals_each_sample_alone(megatron_world):
    """--qkv-format thd: three samples back to back as one stream (Megatron's PackedSeqParams) give each sample's
    own logits: RoPE restarts, attention stays inside the sample."""
    from streamrl.train.packed import pack_stream

    hf = hf_model("qwen3", True, seed=4)
    args = default_args(train_backend="megatron", hf_checkpoint="tiny")
    gpt, a = build_gpt(args, hf.config, torch.device("cpu"))
    load_hf_state(gpt, hf.state_dict(), a, 0, 1)
    model = HFLikeModel(gpt, a).eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(6, 88, (n,), generator=g).tolist() for n in (5, 9, 3)]
    s = pack_stream(seqs, [2, 4, 1], [3, 5, 2])
    with torch.no_grad():
        packed = model(input_ids=s.input_ids, position_ids=s.position_ids, **s.attention_kwargs())[0]
        alone = torch.cat([model(input_ids=torch.tensor([t]))[0] for t in seqs])
    assert packed.shape == alone.shape == (17, 88)
    assert (packed - alone).abs().max().item() < 1e-5
    crossed = model(input_ids=s.input_ids)[0]  # the same stream without boundaries: later samples differ
    assert (crossed[5:] - alone[5:]).abs().max().item() > 1e-3
