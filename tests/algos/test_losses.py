"""Losses, off-policy weights and reductions against hand-computed numbers; the three-policy objective."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from streamrl.algos import (
    LossReducer,
    call_tis_function,
    cispo_loss,
    icepop_function,
    importance_weights,
    pg_loss,
    ppo_clip_loss,
    value_loss,
    vanilla_tis_function,
)

T = torch.tensor
L = math.log


@pytest.mark.parametrize(
    "ratio, adv, c, loss, grad",
    [
        (3.0, -1.0, 4.0, 3.0, 3.0),  # −c·A = 4 above the unclipped 3: still ρ's gradient −A·ρ = 3
        (3.0, -1.0, 2.0, 2.0, 0.0),  # dual clip caps the loss at −c·A = 2: no gradient
        (0.5, -1.0, 2.0, 0.8, 0.0),  # below 1−ε: the ordinary clip (0.8) is below c|A|
        (3.0, 1.0, 2.0, -1.2, 0.0),  # A > 0: dual clip does not apply
    ],
)
def test_dual_clip(ratio, adv, c, loss, grad):
    lp = torch.log(T([ratio])).requires_grad_()
    out, _ = ppo_clip_loss(lp, torch.zeros(1), T([adv]), 0.2, eps_clip_c=c)
    torch.testing.assert_close(out, T([loss]))
    out.sum().backward()
    torch.testing.assert_close(lp.grad, T([grad]))
    with pytest.raises(ValueError):
        ppo_clip_loss(lp, torch.zeros(1), T([adv]), 0.2, eps_clip_c=1.0)


def test_gspo_sequence_ratio_by_hand():
    old = torch.zeros(1, 3)
    mask = T([[1.0, 1, 0]])
    for eps_high, clipped in ((0.2, True), (0.28, False)):
        lp = T([[0.1, 0.3, 5.0]]).requires_grad_()  # the masked token's log-ratio (5.0) must not count
        loss, clip, ppo_kl = pg_loss("gspo", lp, old, T([1.0]), mask, eps_clip=0.2, eps_clip_high=eps_high)
        s = 0.2  # mean of 0.1 and 0.3
        torch.testing.assert_close(ppo_kl, T([[-s] * 3]))
        if clipped:  # e^0.2 = 1.2214 > 1.2: every token clipped, no gradient
            torch.testing.assert_close(loss, T([[-1.2] * 3]))
            assert clip.tolist() == [[1.0] * 3]
        else:
            torch.testing.assert_close(loss, T([[-math.exp(s)] * 3]))
        (loss * mask).sum().backward()
        # d/dℓ_t Σ_masked(−e^s) = −2·e^s·(1/2) for the two masked-in tokens, 0 for the masked one
        expected = [0.0, 0.0, 0.0] if clipped else [-math.exp(s), -math.exp(s), 0.0]
        torch.testing.assert_close(lp.grad, T([expected]))


def test_cispo_by_hand_gradient_through_logprob_only():
    lp = torch.log(T([0.5, 1.0, 2.0])).requires_grad_()
    loss, clip = cispo_loss(lp, torch.zeros(3), T([1.0, 1.0, -1.0]), eps_clip=0.2, eps_clip_high=0.28)
    torch.testing.assert_close(loss, T([-0.8 * L(0.5), 0.0, 1.28 * L(2.0)]))
    assert clip.tolist() == [1.0, 0.0, 1.0]
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, T([-0.8, -1.0, 1.28]))  # −w·A: clipped tokens keep a gradient


def test_value_loss_by_hand():
    v = T([1.0, 0.6]).requires_grad_()
    loss, clip = value_loss(v, T([0.5, 0.5]), T([2.0, 0.0]), value_clip=0.2)
    torch.testing.assert_close(loss, T([1.69, 0.36]))  # (0.7 − 2)² beats (1 − 2)²; 0.6 is inside the clip
    assert clip.tolist() == [1.0, 0.0]
    loss.sum().backward()
    torch.testing.assert_close(v.grad, T([0.0, 1.2]))
    torch.testing.assert_close(value_loss(v, T([0.5, 0.5]), T([2.0, 0.0]), None)[0], T([1.0, 0.36]))
    # slime's clip fraction counts |V - V_old| > eps even where the unclipped term wins: V 1.0, V_old 0.5, R 0:
    # (1 - 0)^2 = 1 beats (0.7 - 0)^2 = 0.49, yet the value moved 0.5 > 0.2
    loss, clip = value_loss(T([1.0]), T([0.5]), T([0.0]), value_clip=0.2)
    assert loss.tolist() == [1.0] and clip.tolist() == [1.0]


# ---------------------------------------------------------------- off-policy weights

OLD = torch.log(T([[3.0, 0.5, 1.5], [4.0, 1.0, 1.0]]))
ROLL = torch.zeros(2, 3)
MASK = T([[1.0, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "level, mode, low, high, w, new_mask",
    [
        ("token", "truncate", 0.0, 2.0, [[2, 0.5, 1.5], [2, 1, 0]], MASK.tolist()),
        ("token", "mask", 0.5, 2.0, [[0, 0.5, 1.5], [0, 1, 0]], [[0, 1, 1], [0, 1, 0]]),  # IcePop
        ("sequence", "truncate", 0.0, 2.0, [[2, 2, 2], [2, 2, 0]], MASK.tolist()),  # 3·0.5·1.5 = 2.25, 4·1 = 4
        ("sequence", "mask", 0.5, 2.5, [[2.25] * 3, [0, 0, 0]], [[1, 1, 1], [0, 0, 0]]),
        ("geometric", "truncate", 0.0, 3.0, [[2.25 ** (1 / 3)] * 3, [2, 2, 0]], MASK.tolist()),
    ],
)
def test_importance_weights_by_hand(level, mode, low, high, w, new_mask):
    weights, m, metrics = importance_weights(OLD, ROLL, MASK, level=level, mode=mode, clip_low=low, clip_high=high)
    torch.testing.assert_close(weights, T(w, dtype=torch.float32))
    assert m.tolist() == new_mask
    assert not weights.requires_grad
    assert set(metrics) == {"tis", "tis_clipfrac", "tis_abs"}


def test_importance_weights_on_policy_are_exactly_one():
    lp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) - 2
    for level in ("token", "sequence", "geometric"):
        w, m, metrics = importance_weights(lp, lp.clone(), torch.ones(3, 5), level=level, mode="mask",
                                           clip_low=1.0, clip_high=1.0)
        assert torch.equal(w, torch.ones(3, 5)) and torch.equal(m, torch.ones(3, 5))
        assert metrics["tis_clipfrac"].sum() == 0


def test_slime_convention_plugins_match_builtin_and_keep_padding():
    args = SimpleNamespace(tis_clip=2.0, tis_clip_low=0.5)
    pg = torch.randn(2, 3).requires_grad_()
    rlen = [3, 2]
    out, m, metrics = call_tis_function(vanilla_tis_function, args, pg, OLD, ROLL, MASK, [4, 4], rlen)
    w, _, ref_metrics = importance_weights(OLD, ROLL, MASK, clip_low=0.5, clip_high=2.0)
    torch.testing.assert_close(out, pg * w)
    assert torch.equal(m, MASK)
    torch.testing.assert_close(metrics["tis"] * MASK, ref_metrics["tis"] * MASK)
    out.sum().backward()
    torch.testing.assert_close(pg.grad, w)  # gradient reaches the padded layout through the flat one
    ice, _, _ = call_tis_function(icepop_function, args, pg.detach(), OLD, ROLL, MASK, [4, 4], rlen)
    w_ice, _, _ = importance_weights(OLD, ROLL, MASK, mode="mask", clip_low=0.5, clip_high=2.0)
    torch.testing.assert_close(ice, pg.detach() * w_ice)


def test_reducer_rejected_tokens_keep_denominators():
    v = T([[1.0, 2, 3], [4, 5, 6]])
    orig = T([[1.0, 1, 1], [1, 1, 0]])
    kept = T([[0.0, 1, 1], [1, 1, 0]])  # token (0, 0) rejected by the off-policy function
    torch.testing.assert_close(LossReducer("sample_mean", 2)(v, kept, orig), T((5 / 3 + 9 / 2) / 2))
    torch.testing.assert_close(LossReducer("token_mean", 2, 5.0)(v, kept, orig), T(14 / 5))
    torch.testing.assert_close(LossReducer("constant", 2, constant=4.0)(v, kept, orig), T(14 / 8))
    # without a separate denominator mask, sample_mean divides by the kept count (what the trainer must NOT do)
    assert LossReducer("sample_mean", 2)(v, kept).item() != pytest.approx((5 / 3 + 9 / 2) / 2)
    with pytest.raises(ValueError):
        LossReducer("constant", 2)


# ---------------------------------------------------------------- the three-policy objective


def _bandit():
    """One state, V = 5 actions: behaviour µ, proximal π_old = π_θ at the start, per-action advantage A."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(5, generator=g).requires_grad_()
    mu = torch.softmax(torch.randn(5, generator=g), 0)
    adv = torch.randn(5, generator=g)
    return theta, mu, adv


def _estimator_gradient(theta, mu, adv, use_tis: bool, clip_high: float = 100.0):
    """Exact expectation over y ~ µ of the trainer's per-token loss, by enumerating all 5 actions.

    Every action is one "sample" whose advantage is scaled by 5·µ(y), so the sample mean is Σ_y µ(y)·(...).
    """
    ys = torch.arange(5)
    lp = torch.log_softmax(theta, 0)[ys].unsqueeze(1)  # ℓθ, [5, 1]
    old = lp.detach()  # π_old = π_θ at the start of the step
    roll = torch.log(mu)[ys].unsqueeze(1)  # ℓroll: what the engine recorded
    mask = torch.ones(5, 1)
    pg, _, _ = pg_loss("ppo", lp, old, (adv * mu * 5).unsqueeze(1), mask, eps_clip=0.2)
    if use_tis:
        w, mask, _ = importance_weights(old, roll, mask, clip_high=clip_high)
        pg = pg * w
    loss = LossReducer("sample_mean", 5)(pg, mask)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def test_three_policy_tis_recovers_the_on_policy_gradient():
    theta, mu, adv = _bandit()
    # target: −∇_θ E_{y~π_θ}[A(y)] at θ = θ_old (minimising the loss ascends the expected advantage)
    (target,) = torch.autograd.grad(-(torch.softmax(theta, 0) * adv).sum(), theta)
    torch.testing.assert_close(_estimator_gradient(theta, mu, adv, use_tis=True), target)
    # without the behaviour correction the same data gives a different (biased) gradient
    biased = _estimator_gradient(theta, mu, adv, use_tis=False)
    assert (biased - target).abs().max() > 0.05
    # truncation trades bias for variance: with a tight clip it is in between
    clipped = _estimator_gradient(theta, mu, adv, use_tis=True, clip_high=1.0)
    assert 0 < (clipped - target).abs().max() < (biased - target).abs().max() + 1e-6


def test_three_policy_clip_is_anchored_at_proximal_not_behaviour():
    """PPO's ratio is π_θ/π_old: the behaviour log-prob only enters through the (detached) TIS weight."""
    lp = torch.log(T([[1.5, 1.1]])).requires_grad_()  # π_θ/π_old = 1.5 (clipped) and 1.1 (inside)
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    for roll in (torch.zeros(1, 2), T([[-3.0, 0.4]])):  # on-policy behaviour, then a very stale one
        pg, clip, ppo_kl = pg_loss("ppo", lp, old, T([1.0]), mask, eps_clip=0.2)
        assert clip.tolist() == [[1.0, 0.0]]
        torch.testing.assert_close(ppo_kl, -lp.detach())
        w, _, _ = importance_weights(old, roll, mask, clip_high=2.0)
        (g,) = torch.autograd.grad((pg * w).sum(), lp)
        torch.testing.assert_close(g, T([[0.0, -1.1]]) * w)  # clipped token: 0; inside: −ρ·A·w
