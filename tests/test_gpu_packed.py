"""GPU: the packed trainer path (--qkv-format thd) gives the padded path's values in bf16 on CUDA, with each
attention kernel (sdpa's block-diagonal mask, flex_attention's block mask, FlashAttention varlen), per-layer
torch.compile and Liger's kernels: the same step as tests/test_packed.py, compared within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from streamrl.config import default_args
from streamrl.train.critic import ValueModel
from streamrl.train.kernels import apply_liger, attention_options, compile_layers
from tests.test_packed import _models, _step

pytestmark = pytest.mark.gpu

FLAGS = dict(advantage_estimator="ppo", use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01,
             calculate_per_token_loss=True, use_dynamic_batch_size=True, max_tokens_per_gpu=40)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("attn, kernels", [("sdpa", ""), ("flex_attention", ""), ("varlen", ""),
                                           ("varlen", "compile"), ("varlen", "liger")])
def test_packed_equals_padded_in_bf16(arch, attn, kernels):
    if kernels == "liger":
        pytest.importorskip("liger_kernel", reason="--use-liger-kernel needs the liger-kernel wheel (docs/gpu.md)")
    attention_options(default_args(qkv_format="thd", attn_implementation="varlen"))  # registers "varlen"
    padded = _step(default_args(**FLAGS), *_models(arch, "sdpa", None, "cuda", torch.bfloat16))
    models = _models(arch, attn, 5, "cuda", torch.bfloat16)
    for m in models:
        decoder = m.backbone if isinstance(m, ValueModel) else m.model
        if kernels == "liger":
            apply_liger(decoder)
        if kernels == "compile":
            compile_layers(decoder.layers)
    packed = _step(default_args(qkv_format="thd", attn_implementation=attn, **FLAGS), *models)
    assert padded[2].keys() == packed[2].keys()
    worst = 0.0
    for key, want in padded[2].items():  # log-probs, entropies, values, reference log-probs, per token
        for a, b in zip(want, packed[2][key], strict=True):
            worst = max(worst, (a.float() - b.float()).abs().max().item())
    assert worst < 0.05, worst  # bf16 rounding of a different kernel order; a leak across samples is O(1)
    for k in ("loss", "pg_loss", "value_loss", "entropy"):
        assert abs(packed[1][k].item() - padded[1][k].item()) <= 0.02 * abs(padded[1][k].item()) + 1e-3, k
    grads = [_rel(b, a) for a, b in zip(padded[0], packed[0], strict=True) if a.float().norm() > 0]
    assert max(grads) < 0.05, max(grads)


def test_fused_chunked_head_equals_eager_in_bf16():
    """--use-torch-compile's fused LM-head chunks (chunked_logprobs.py) on CUDA in bf16, at a real vocabulary size:
    the eager chunks' log-probs and entropies (fp32 math on the same bf16 logits) and gradients (bf16 rounding)."""
    from streamrl.algos.chunked_logprobs import chunked_log_probs

    g = torch.Generator(device="cuda").manual_seed(0)
    n, c, v = 3000, 1024, 151936
    h0 = torch.randn(n, c, device="cuda", generator=g).bfloat16()
    w0 = (torch.randn(v, c, device="cuda", generator=g) * 0.02).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    a, b = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)
    out = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, ent = chunked_log_probs(h, w, targets, 1.0, chunk=1024, fused=fused)
        ((a * lp).sum() + (b * ent).sum()).backward()
        out.append((lp.detach(), ent.detach(), h.grad, w.grad))
    (lp0, ent0, gh0, gw0), (lp1, ent1, gh1, gw1) = out
    torch.testing.assert_close(lp1, lp0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent1, ent0, atol=1e-4, rtol=1e-4)
    assert _rel(gh1, gh0) < 1e-2 and _rel(gw1, gw0) < 1e-2
