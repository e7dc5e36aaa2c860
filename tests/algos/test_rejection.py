"""Rejection sampling, veto, batch normalisation, OPSM and per-rollout denominators against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from streamrl.algos import (
    LossReducer,
    batch_normalized,
    mis_weights,
    opsm_keep,
    ppo_clip_loss,
    rejection_keep,
    rollout_mask_sums,
    veto_keep,
)

T = torch.tensor
OLD = torch.log(T([[3.0, 0.5, 1.5], [4.0, 1.0, 1.0]]))  # π_old/µ with µ = 1 (ℓroll = 0)
ROLL = torch.zeros(2, 3)
MASK = T([[1.0, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "level, low, high, keep, frac_low, frac_high",
    [
        ("token", 0.6, 2.0, [[0, 0, 1], [0, 1, 0]], [[0, 1, 0], [0, 0, 0]], [[1, 0, 0], [1, 0, 0]]),
        # products 3·0.5·1.5 = 2.25 and 4·1 = 4 (the masked token does not count)
        ("sequence", 0.5, 2.5, [[1, 1, 1], [0, 0, 0]], [[0] * 3, [0] * 3], [[0] * 3, [1] * 3]),
        # geometric means 2.25^(1/3) = 1.31 and 4^(1/2) = 2
        ("geometric", 0.5, 1.5, [[1, 1, 1], [0, 0, 0]], [[0] * 3, [0] * 3], [[0] * 3, [1] * 3]),
    ],
)
def test_rejection_keep_by_hand(level, low, high, keep, frac_low, frac_high):
    k, m = rejection_keep(OLD, ROLL, MASK, level=level, low=low, high=high)
    assert k.tolist() == keep
    assert m["mis_rs_mask_fraction_low"].tolist() == frac_low
    assert m["mis_rs_mask_fraction_high"].tolist() == frac_high


def test_veto_drops_whole_sequences_on_a_catastrophic_loss_token():
    # sample 0: a loss token with π_old/µ = 1e-5 < 1e-4 -> the whole sample goes; sample 1: the same ratio on a
    # masked (tool) token does not count; sample 2: 2e-4 is above the threshold
    old = torch.log(T([[1.0, 1e-5, 1.2], [1.0, 1.0, 1e-5], [2e-4, 1.0, 1.0]]))
    mask = T([[1.0, 1, 1], [1, 1, 0], [1, 1, 1]])
    keep, m = veto_keep(old, torch.zeros(3, 3), mask, 1e-4)
    assert keep.tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert m["mis_rs_catastrophic_token_fraction"].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert m["mis_rs_catastrophic_seq_fraction"].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]


def test_batch_normalized_by_hand():
    w = T([[2.0, 0.5, 1.5], [2.0, 1.0, 9.0]])  # the masked 9 does not count
    out, mean = batch_normalized(w, MASK, "token")
    torch.testing.assert_close(mean, T(7.0 / 5))
    torch.testing.assert_close(out, w / 1.4)
    # sequence level: the mean over samples of each sample's weight; a sample with no loss token counts as 0
    w = T([[2.0, 2.0], [1.0, 1.0], [5.0, 5.0]])
    out, mean = batch_normalized(w, T([[1.0, 1], [1, 0], [0, 0]]), "sequence")
    torch.testing.assert_close(mean, T(1.0))
    torch.testing.assert_close(out, w)
    # all weights 0: left as they are, factor 1
    out, mean = batch_normalized(torch.zeros(1, 2), torch.ones(1, 2), "token")
    assert out.tolist() == [[0.0, 0.0]] and mean.item() == 1.0
    with pytest.raises(ValueError, match="--tis-batch-normalize"):
        batch_normalized(w, torch.ones(3, 2), "geometric")


def test_mis_chain_values_and_gradient():
    """slime's MIS recipe (mis.yaml): token TIS truncated at 2, token RS in [0.5, 2], veto 1e-4, batch-normalised.

    sample 0: π_old/µ = 3, 0.5, 1.5 -> w = 2, 0.5, 1.5; RS rejects the 3 (> 2)
    sample 1: π_old/µ = 1, 1e-5, 1.2 -> w = 1, 1e-5, 1.2; the 1e-5 vetoes the whole sample
    mean over the 6 loss tokens (rejected ones included): (2 + 0.5 + 1.5 + 1 + 1e-5 + 1.2) / 6
    """
    old = torch.log(T([[3.0, 0.5, 1.5], [1.0, 1e-5, 1.2]]))
    roll, mask = torch.zeros(2, 3), torch.ones(2, 3)
    w, keep, m = mis_weights(old, roll, mask, level="token", mode="truncate", clip_high=2.0, rs_level="token",
                             rs_low=0.5, rs_high=2.0, veto_threshold=1e-4, normalize=True)
    mean = (2 + 0.5 + 1.5 + 1 + 1e-5 + 1.2) / 6
    torch.testing.assert_close(w, T([[2.0, 0.5, 1.5], [1.0, 1e-5, 1.2]]) / mean)
    assert keep.tolist() == [[0, 1, 1], [0, 0, 0]]
    torch.testing.assert_close(m["mis_batch_norm_factor"], torch.full((2, 3), mean))
    assert not w.requires_grad and not keep.requires_grad
    # one optimizer step: ℓθ = ℓold, ρ = 1, so L_t = −A·w_t; kept tokens count over the ORIGINAL denominators (3)
    theta = old.clone().requires_grad_()
    pg, _ = ppo_clip_loss(theta, old, T([[1.0], [-1.0]]), 0.2)
    loss = LossReducer("sample_mean", 2)(pg * w, keep, mask)
    torch.testing.assert_close(loss, T(-(0.5 + 1.5) / mean / 6))
    loss.backward()
    torch.testing.assert_close(theta.grad, T([[0.0, -0.5, -1.5], [0.0, 0.0, 0.0]]) / mean / 6)


def test_mis_mask_mode_normalises_with_the_ratio_of_rejected_tokens():
    # mask mode rejects the 3 (outside [0.5, 2]); slime's normalisation still counts its ratio: (3 + 1) / 2
    w, keep, _ = mis_weights(torch.log(T([[3.0, 1.0]])), torch.zeros(1, 2), torch.ones(1, 2), mode="mask",
                             clip_low=0.5, clip_high=2.0, normalize=True)
    assert keep.tolist() == [[0, 1]]
    torch.testing.assert_close(w, T([[1.5, 0.5]]))


def test_mis_on_policy_changes_nothing():
    lp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) - 2
    w, keep, _ = mis_weights(lp, lp.clone(), torch.ones(3, 5), rs_level="sequence", rs_low=1.0, rs_high=1.0,
                             veto_threshold=1e-4, normalize=True)
    assert torch.equal(w, torch.ones(3, 5)) and torch.equal(keep, torch.ones(3, 5))


def test_opsm_by_hand():
    """Sample-level KL estimate mean_t(ℓold − ℓθ) over loss tokens, δ = 0.05:
    sample 0: (0.2 + 0) / 2 = 0.1 > δ, A < 0 -> dropped; sample 1: same KL, A > 0 -> kept;
    sample 2: 0.01 < δ, A < 0 -> kept."""
    old = T([[0.0, -1.0, 3.0], [0.0, -1.0, 0.0], [0.0, -1.0, 0.0]])
    theta = (old - T([[0.2, 0.0, 5.0], [0.2, 0.0, 0.0], [0.02, 0.0, 0.0]])).requires_grad_()
    mask = T([[1.0, 1, 0], [1, 1, 0], [1, 1, 0]])
    adv = T([-1.0, 1.0, -1.0])
    keep, dropped = opsm_keep(theta, old, adv, mask, 0.05)
    assert keep.tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert dropped.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    pg, _ = ppo_clip_loss(theta, old, adv, 0.2)
    (pg * keep * mask).sum().backward()
    # kept tokens: ∂(−A·ρ)/∂ℓθ = −A·ρ, ρ = e^{ℓθ−ℓold} (e^-0.2 = 0.82, inside the clip); sample 0: none
    rho = torch.exp(theta.detach() - old)
    expected = torch.stack([torch.zeros(3), -rho[1], rho[2]]) * mask
    torch.testing.assert_close(theta.grad, expected)
    # per-token advantages: only the tokens with A_t < 0 of a drifted sample go
    keep, _ = opsm_keep(theta, old, T([[1.0, -1.0, -1.0], [1, 1, 1], [1, 1, 1]]), mask, 0.05)
    assert keep[0].tolist() == [1, 0, 0]


def test_per_rollout_denominators_by_hand():
    """Samples 0 and 1 are one rollout (ids 7, 7), sample 2 another: D = 2 + 3 = 5 for both siblings, N = 2."""
    mask = T([[1.0, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert rollout_mask_sums([7, 7, 3], mask.sum(-1).tolist()) == [5.0, 5.0, 0.0]
    v = T([[1.0, 2, 9], [3, 4, 5], [6, 7, 8]]).requires_grad_()
    denoms = T(rollout_mask_sums([7, 7, 3], mask.sum(-1).tolist()))
    loss = LossReducer("sample_mean", 2)(v, mask, denoms)
    torch.testing.assert_close(loss, T((1 + 2 + 3 + 4 + 5) / 5 / 2))  # the masked rollout adds 0 (D clamped to 1)
    loss.backward()
    torch.testing.assert_close(v.grad, mask / 10)
    # split into micro-batches, the sum is the same: the denominators are the rollout's, not the micro-batch's
    parts = [LossReducer("sample_mean", 2)(v.detach()[i:i + 1], mask[i:i + 1], denoms[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(sum(parts), loss.detach())
    # one sample per rollout is the per-sample mean
    own = T(rollout_mask_sums([0, 1, 2], mask.sum(-1).tolist()))
    torch.testing.assert_close(LossReducer("sample_mean", 3)(v.detach(), mask, own),
                               LossReducer("sample_mean", 3)(v.detach(), mask))
    assert LossReducer("sample_mean", 3)(v.detach(), mask, own).item() == pytest.approx((1.5 + 4) / 3)
