"""streamrl.algos: hand-computed advantages, KL, TIS, PPO and composed losses; reduction equivalence; log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from streamrl.algos import (
    entropy_from_logits,
    expand_to_tokens,
    grpo_advantages,
    kl_estimate,
    masked_sample_mean_sum,
    masked_token_sum,
    policy_loss,
    ppo_clip_loss,
    reduce_metrics,
    response_log_probs,
    sft_loss,
    tis_weights,
    token_log_probs,
)

T = torch.tensor


# ---------------------------------------------------------------- advantages


def test_grpo_exact_values_and_zero_std_group():
    r = T([1.0, 0, 1, 1, 0, 0, 0, 0])
    adv = grpo_advantages(r, n=4)
    # group 0: mean 0.75, unbiased std sqrt((3·0.25² + 0.75²)/3) = 0.5; group 1: all equal -> zeros
    expected = T([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]) / T([0.5 + 1e-6] * 4 + [1e-6] * 4)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(adv[:4], T([0.5, -1.5, 0.5, 0.5]), atol=1e-5, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_grpo_variants():
    r = T([1.0, 0, 1, 1, 0, 0, 0, 0])
    torch.testing.assert_close(grpo_advantages(r, 4, std_normalize=False), T([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]))
    assert torch.equal(grpo_advantages(r, 1), torch.zeros(8))  # n=1: mean subtraction only, of itself
    raw = grpo_advantages(r, 4, normalize=False)
    assert torch.equal(raw, r) and raw is not r
    assert grpo_advantages(T([1, 0]), 2).dtype == torch.float32  # integer rewards are promoted
    with pytest.raises(ValueError):
        grpo_advantages(r, 3)
    expanded = expand_to_tokens(T([2.0, -1.0]), T([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(expanded, T([[2.0, 2, 0], [-1, 0, 0]]))


# ---------------------------------------------------------------- KL, TIS


def test_kl_estimators():
    ref = torch.zeros(4)
    lp = T([0.0, 1.0, -1.0, -20.0])  # δ = lp
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), lp)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), T([0.0, 0.5, 0.5, 200.0]))
    k3 = T([0.0, math.exp(-1), math.e - 2, math.exp(20) - 21])
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), k3)
    torch.testing.assert_close(kl_estimate(lp, ref, "low_var_kl"), T([0.0, math.exp(-1), math.e - 2, 10.0]))
    # δ is ℓ − ℓref, not the other way round
    torch.testing.assert_close(kl_estimate(ref[:2], T([0.0, -1.0]), "k3"), T([0.0, math.exp(-1)]))
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


def test_tis_weights_clip_and_metrics():
    roll = torch.zeros(3)
    old = torch.log(T([3.0, 0.5, 1.0]))
    w, m = tis_weights(old, roll, clip_high=2.0)
    torch.testing.assert_close(w, T([2.0, 0.5, 1.0]))
    torch.testing.assert_close(m["tis"], T(1.5))  # raw ratio mean (3 + 0.5 + 1) / 3
    torch.testing.assert_close(m["tis_clipfrac"], T(1 / 3))
    torch.testing.assert_close(m["tis_abs"], T((2 + 0.5 + 0) / 3))
    w, m = tis_weights(old, roll, clip_high=2.0, clip_low=0.6, mask=T([1, 1, 0]))
    torch.testing.assert_close(w, T([2.0, 0.6, 1.0]))
    torch.testing.assert_close(m["tis_clipfrac"], T(1.0))
    torch.testing.assert_close(m["tis"], T(1.75))
    old_g = old.clone().requires_grad_()
    assert not tis_weights(old_g, roll, 2.0)[0].requires_grad


def test_tis_on_policy_is_exactly_one():
    lp = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) - 3
    w, m = tis_weights(lp, lp.clone(), clip_high=2.0)
    assert torch.equal(w, torch.ones_like(lp))
    assert m["tis_clipfrac"].item() == 0.0 and m["tis"].item() == 1.0


# ---------------------------------------------------------------- PPO


@pytest.mark.parametrize(
    "ratio, adv, eps_high, loss, clipped",
    [
        (1.1, 1.0, None, -1.1, 0.0),  # A>0 inside the range
        (1.5, 1.0, None, -1.2, 1.0),  # A>0 above 1+ε: clipped
        (0.5, 1.0, None, -0.5, 0.0),  # A>0 below 1−ε: the unclipped (smaller gain) term wins
        (0.5, -1.0, None, 0.8, 1.0),  # A<0 below 1−ε: clipped
        (1.5, -1.0, None, 1.5, 0.0),  # A<0 above 1+ε: unclipped
        (0.9, -2.0, None, 1.8, 0.0),  # A<0 inside
        (1.25, 1.0, 0.28, -1.25, 0.0),  # clip-higher: 1.25 < 1.28 is inside
        (1.25, 1.0, None, -1.2, 1.0),  # same ratio with symmetric ε = 0.2 is clipped
        (1.5, 1.0, 0.28, -1.28, 1.0),
    ],
)
def test_ppo_clip_cases(ratio, adv, eps_high, loss, clipped):
    lp = torch.log(T([ratio])).requires_grad_()
    out, frac = ppo_clip_loss(lp, torch.zeros(1), T([adv]), eps_clip=0.2, eps_clip_high=eps_high)
    torch.testing.assert_close(out, T([loss]))
    assert frac.item() == clipped
    out.sum().backward()
    # the gradient is cut exactly where the clipped term is active: dL/dℓ = −ρ·A otherwise
    torch.testing.assert_close(lp.grad, T([0.0 if clipped else -ratio * adv]))


def test_ppo_per_sample_advantages_broadcast():
    lp = torch.zeros(2, 3)
    out, _ = ppo_clip_loss(lp, lp, T([1.0, -2.0]), 0.2)
    torch.testing.assert_close(out, T([[-1.0] * 3, [2.0] * 3]))


# ---------------------------------------------------------------- composed loss and reductions


def test_policy_loss_by_hand_2x3():
    ratios = T([[1.0, 1.5, 0.5], [1.1, 0.9, 1.0]])
    lp = torch.log(ratios)
    old = torch.zeros(2, 3)
    adv = T([1.0, -1.0])
    w = T([[2.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    delta = T([[0.1, 0.0, 0.0], [0.0, 0.0, -0.2]])
    ent = T([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    loss, metrics = policy_loss(
        lp,
        old,
        adv,
        eps_clip=0.2,
        tis_weights=w,
        ref_log_probs=lp - delta,
        kl_loss_coef=0.5,
        kl_loss_type="k1",
        entropy=ent,
        entropy_coef=0.1,
    )
    # PPO: row0 (A=1) [-1, -1.2 (clipped), -0.5]; row1 (A=-1) [1.1, 0.9, 1.0]
    # × TIS: [-2, -1.2, -0.5], [0.55, 0.9, 1.0]; + 0.5·δ: +[0.05, 0, 0], [0, 0, -0.1]; − 0.1·H
    expected = T([[-2.05, -1.3, -0.6], [0.35, 0.7, 0.7]])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["pg_loss"], T([[-2.0, -1.2, -0.5], [0.55, 0.9, 1.0]]))
    assert metrics["pg_clipfrac"].tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # per-sample token means: (-2.05 - 1.3)/2 = -1.675 and (0.35 + 0.7 + 0.7)/3 = 0.58333; summed
    torch.testing.assert_close(masked_sample_mean_sum(loss, mask), T(-1.675 + 1.75 / 3))
    torch.testing.assert_close(masked_token_sum(loss, mask), T(-2.05 - 1.3 + 0.35 + 0.7 + 0.7))
    red = reduce_metrics(metrics, mask)
    torch.testing.assert_close(red["pg_clipfrac"], T(0.5))
    torch.testing.assert_close(red["entropy"], T(1.0 + 2.0))
    # without the optional terms it is the plain PPO loss
    plain, m2 = policy_loss(lp, old, adv, eps_clip=0.2)
    torch.testing.assert_close(plain, T([[-1.0, -1.2, -0.5], [1.1, 0.9, 1.0]]))
    assert set(m2) == {"pg_loss", "pg_clipfrac", "ppo_kl"}


def test_unbiased_kl_by_hand():
    """--use-unbiased-kl: β·ρ·KL with ρ = exp(ℓθ − ℓold) kept in the graph. ℓθ = −1, ℓold = −1.2, ℓref = −1.5, k1:
    δ = 0.5, ρ = e^0.2, loss ρδ = 0.61070, d/dℓθ = ρ(δ + 1) = 1.83210 (plain k1: 0.5 and 1)."""
    for unbiased, value, grad in ((True, math.exp(0.2) * 0.5, math.exp(0.2) * 1.5), (False, 0.5, 1.0)):
        lp = T([[-1.0]]).requires_grad_()
        loss, m = policy_loss(lp, T([[-1.2]]), T([0.0]), ref_log_probs=T([[-1.5]]), kl_loss_coef=1.0,
                              kl_loss_type="k1", unbiased_kl=unbiased)
        loss.sum().backward()
        assert loss.item() == pytest.approx(value, rel=1e-6) and m["kl_loss"].item() == pytest.approx(value, rel=1e-6)
        assert lp.grad.item() == pytest.approx(grad, rel=1e-6)


def test_unbiased_low_var_kl_clamps_the_product_as_slime():
    """slime's compute_approx_kl: ρ·k3, then low_var_kl clamps to [−10, 10]. δ = ℓθ − ℓref = −2.5: k3 = e^2.5 − 3.5
    = 8.6825 (under the clamp); ρ = 2: ρ·k3 = 17.365 -> 10, and no gradient through the clamp."""
    lp = T([[0.0]]).requires_grad_()
    ratio = torch.exp(lp - T([[-math.log(2.0)]]))
    kl = kl_estimate(lp, T([[2.5]]), "low_var_kl", importance_ratio=ratio)
    kl.sum().backward()
    assert kl.item() == pytest.approx(10.0) and lp.grad.item() == 0.0
    k3 = kl_estimate(T([[0.0]]), T([[2.5]]), "k3", importance_ratio=T([[2.0]]))  # k3 is never clamped
    assert k3.item() == pytest.approx(2 * (math.exp(2.5) - 3.5), rel=1e-6)


def test_token_count_counts_a_fully_masked_sample_as_one_token():
    from streamrl.algos import token_count

    assert token_count(T([[1, 1, 0], [0, 0, 0], [1, 1, 1]])).item() == 2 + 1 + 3  # slime's per-token denominator


def test_reductions_and_sft():
    v = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = T([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(masked_sample_mean_sum(v, m), T(2.0 + 4.0 + 0.0))  # empty sample contributes 0
    torch.testing.assert_close(masked_token_sum(v, m), T(10.0))
    torch.testing.assert_close(sft_loss(-v, m), T(6.0))


# ---------------------------------------------------------------- gradient equivalence of micro-batching / DP


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.mix(torch.cumsum(h, dim=1)))  # causal mixing so context matters
        return self.head(h)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3), (1, 5), (3, 1), (2, 4), (4, 2), (1, 6)]  # (prompt, response)
    tokens = [torch.randint(1, 13, (p + r,), generator=g).tolist() for p, r in shapes]
    rmax = max(r for _, r in shapes)
    old = -torch.rand(len(shapes), rmax, generator=g) - 1.5
    roll = old + 0.3 * torch.randn(len(shapes), rmax, generator=g)
    ref = old + 0.2 * torch.randn(len(shapes), rmax, generator=g)
    adv = torch.randn(len(shapes), generator=g)
    return tokens, shapes, old, roll, ref, adv


def _grads(model, tokens, shapes, old, roll, ref, adv, idx, scale, reduce="sample"):
    """Backward of one micro-batch (rows `idx`) with loss = R(L)·scale; returns nothing (grads accumulate)."""
    sub = [tokens[i] for i in idx]
    p = [shapes[i][0] for i in idx]
    r = [shapes[i][1] for i in idx]
    out = response_log_probs(model, sub, p, r, temperature=0.9, with_entropy=True)
    rm = out.log_probs.shape[1]
    o, ro, rf = old[idx, :rm], roll[idx, :rm], ref[idx, :rm]
    w, _ = tis_weights(o, ro, clip_high=2.0)
    loss, _ = policy_loss(
        out.log_probs,
        o,
        adv[idx],
        eps_clip=0.2,
        eps_clip_high=0.28,
        tis_weights=w,
        ref_log_probs=rf,
        kl_loss_coef=0.1,
        kl_loss_type="low_var_kl",
        entropy=out.entropy,
        entropy_coef=0.01,
    )
    red = masked_sample_mean_sum(loss, out.mask) if reduce == "sample" else masked_token_sum(loss, out.mask)
    (red * scale).backward()


def _collect(model):
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return g


def test_microbatch_and_dp_split_give_full_batch_gradient():
    torch.manual_seed(0)
    model = TinyLM()
    batch = _batch()
    n = len(batch[1])
    _grads(model, *batch, idx=list(range(n)), scale=1 / n)
    full = _collect(model)
    assert any(g.abs().sum() > 0 for g in full)

    for mbs in ([[0], [1], [2], [3], [4], [5]], [[0, 1, 2, 3], [4, 5]], [[5, 2], [0, 4, 1], [3]]):
        for idx in mbs:
            _grads(model, *batch, idx=idx, scale=1 / n)
        for a, b in zip(_collect(model), full, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    # 2 ranks x 2 micro-batches: each rank scales by world/N, then gradients are averaged over ranks
    world, per_rank = 2, [[[0, 1], [2]], [[3], [4, 5]]]
    rank_grads = []
    for mbs in per_rank:
        for idx in mbs:
            _grads(model, *batch, idx=idx, scale=world / n)
        rank_grads.append(_collect(model))
    for g0, g1, b in zip(*rank_grads, full, strict=True):
        torch.testing.assert_close((g0 + g1) / world, b, atol=1e-6, rtol=1e-5)

    # per-token mode: divide by the global token count instead
    ntok = sum(r for _, r in batch[1])
    _grads(model, *batch, idx=list(range(n)), scale=1 / ntok, reduce="token")
    full_tok = _collect(model)
    for idx in ([0, 1], [2, 3, 4], [5]):
        _grads(model, *batch, idx=idx, scale=1 / ntok, reduce="token")
    for a, b in zip(_collect(model), full_tok, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    # the test can tell: averaging per-micro-batch token means does not give the full-batch token mean
    mbs = ([0, 1], [2, 3, 4], [5])
    for idx in mbs:
        _grads(model, *batch, idx=idx, scale=1 / sum(batch[1][i][1] for i in idx) / len(mbs), reduce="token")
    naive = _collect(model)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(naive, full_tok, strict=True))


# ---------------------------------------------------------------- log-probs


def test_token_log_probs_and_entropy_match_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    tgt = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, tgt[..., None]).squeeze(-1)
    torch.testing.assert_close(token_log_probs(logits, tgt, 0.7), ref)
    ent = torch.distributions.Categorical(logits=logits / 0.7).entropy()
    torch.testing.assert_close(entropy_from_logits(logits, 0.7), ent)
    assert token_log_probs(logits.bfloat16(), tgt).dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    )
    return Qwen3ForCausalLM(cfg).eval()


def test_response_log_probs_padding_invariant(tiny_qwen3):
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 5), (7, 2), (1, 9), (4, 0), (2, 1)]
    tokens = [torch.randint(1, 64, (p + r,), generator=g).tolist() for p, r in shapes]
    p, r = [s[0] for s in shapes], [s[1] for s in shapes]
    with torch.no_grad():
        out = response_log_probs(tiny_qwen3, tokens, p, r, temperature=0.8, pad_id=0, with_entropy=True)
        assert out.log_probs.shape == out.mask.shape == out.entropy.shape == (5, 9)
        assert out.mask.sum(1).tolist() == [float(x) for x in r]
        for i, (toks, pi, ri) in enumerate(zip(tokens, p, r, strict=True)):
            logits = tiny_qwen3(input_ids=T([toks])).logits[0, pi - 1 : pi + ri - 1]
            ref = torch.log_softmax(logits / 0.8, -1).gather(-1, T(toks[pi:])[:, None]).squeeze(-1)
            torch.testing.assert_close(out.log_probs[i, :ri], ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.entropy[i, :ri], entropy_from_logits(logits, 0.8), atol=1e-5, rtol=0)
            assert torch.all(out.log_probs[i, ri:] == 0) and torch.all(out.mask[i, ri:] == 0)
        # a different pad id changes nothing
        other = response_log_probs(tiny_qwen3, tokens, p, r, temperature=0.8, pad_id=17)
        torch.testing.assert_close(other.log_probs, out.log_probs, atol=1e-5, rtol=0)


def test_response_log_probs_validates():
    model = TinyLM()
    with pytest.raises(ValueError):
        response_log_probs(model, [[1, 2, 3]], [0], [3])  # no logit before the first response token
    with pytest.raises(ValueError):
        response_log_probs(model, [[1, 2, 3]], [1], [3])  # lengths do not add up
    out = response_log_probs(model, [[1, 2, 3]], [1], [2])
    assert out.log_probs.requires_grad and out.entropy is None
