"""Off-policy corrections (streamrl/algos/corrections.py): hand-computed values, gradients and masks."""

from __future__ import annotations

import math
import threading

import torch

from streamrl.algos import (
    behaviour_anchored_loss,
    bucket_means,
    decoupled_ppo_loss,
    kl_behaviour_prox,
    m2_keep_mask,
    mismatch_by_staleness,
)

L = math.log


def test_decoupled_ppo_values_and_gradients():
    # token: (ρ = πθ/πprox, πprox/µ, A)
    #  0: ρ 1.3, w 1.5, A +1  -> clipped at 1.2: L = -1.2·1.5 = -1.8, no gradient
    #  1: ρ 0.9, w 1.5, A +1  -> L = -0.9·1.5 = -1.35, dL/dℓθ = -0.9·1.5 = -1.35
    #  2: ρ 0.7, w 3 -> 2 (truncated), A -1 -> clipped at 0.8: L = 0.8·2 = 1.6, no gradient
    #  3: ρ 1.1, w 0.5, A -1  -> L = 1.1·0.5 = 0.55, dL/dℓθ = 0.55
    prox = torch.tensor([[-1.0, -2.0, -1.5, -0.5]])
    roll = prox - torch.tensor([[L(1.5), L(1.5), L(3.0), L(0.5)]])
    theta = (prox + torch.tensor([[L(1.3), L(0.9), L(0.7), L(1.1)]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, keep, m = decoupled_ppo_loss(theta, prox, roll, adv, torch.ones(1, 4), eps_clip=0.2, clip_high=2.0)
    torch.testing.assert_close(loss, torch.tensor([[-1.8, -1.35, 1.6, 0.55]]))
    loss.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([[0.0, -1.35, 0.0, 0.55]]))
    torch.testing.assert_close(m["pg_clipfrac"], torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(m["tis_clipfrac"], torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    assert torch.equal(keep, torch.ones(1, 4))


def test_decoupled_ppo_clip_is_inert_when_theta_equals_prox():
    """One optimizer step per batch: πθ = πprox, ρ = 1, nothing is clipped however stale µ is; the gradient is
    the weighted policy gradient -w·A."""
    prox = torch.tensor([[-1.0, -3.0]])
    roll = torch.tensor([[-4.0, -0.5]])  # π_prox/µ = e^3 (truncated to 2), e^-2.5
    theta = prox.clone().requires_grad_()
    loss, _, m = decoupled_ppo_loss(theta, prox, roll, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    loss.sum().backward()
    assert m["pg_clipfrac"].sum() == 0
    torch.testing.assert_close(theta.grad, torch.tensor([[-2.0, math.exp(-2.5)]]))


def test_decoupled_ppo_mask_mode_rejects_outside_bounds():
    prox = torch.zeros(1, 3)
    roll = -torch.tensor([[L(0.4), L(1.0), L(2.5)]])  # ratios 0.4, 1, 2.5
    _, keep, _ = decoupled_ppo_loss(prox.clone(), prox, roll, torch.ones(1, 3), torch.ones(1, 3), mode="mask",
                                    clip_low=0.5, clip_high=2.0)
    assert keep.tolist() == [[0.0, 1.0, 0.0]]


def test_behaviour_anchored_clip_bites_at_the_first_step():
    """ρ = πθ/µ: a token whose probability rose by 1.5x since µ (A > 0) has no gradient; one that fell (ρ 0.9) has
    -ρ·A."""
    roll = torch.tensor([[-2.0, -1.0]])
    theta = (roll + torch.tensor([[L(1.5), L(0.9)]])).requires_grad_()
    loss, clip = behaviour_anchored_loss(theta, roll, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.9]]))
    loss.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([[0.0, -0.9]]))
    assert clip.tolist() == [[1.0, 0.0]]


def test_m2_mask_drops_largest_until_mean_below_threshold():
    # δ = 0.1, 0.2, 0.5, 1.0 (δ² 0.01, 0.04, 0.25, 1.0) and a padded position with a huge δ
    # mean of all 0.325 ≥ 0.04; drop 1.0: 0.1; drop 0.25: 0.025 < 0.04 -> keep the first two
    prox = torch.tensor([[0.1, 0.2, 0.5, 1.0, 9.0]])
    roll = torch.zeros(1, 5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert m2_keep_mask(prox, roll, mask, 0.04).tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]
    assert m2_keep_mask(prox, roll, mask, 0.33).tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]  # within budget: no-op
    assert m2_keep_mask(prox, roll, mask, 0.2).tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    assert m2_keep_mask(prox, roll, mask, 0.005).tolist() == [[0.0] * 5]  # even the smallest is over budget
    # the order of the tokens does not matter, negative δ counts by its square
    perm = torch.tensor([[3, 0, 2, 1, 4]])
    got = m2_keep_mask(-prox.gather(1, perm), roll, mask.gather(1, perm), 0.04)
    assert got.tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]


def test_m2_mask_is_the_same_split_over_ranks():
    g = torch.Generator().manual_seed(0)
    prox, roll = torch.randn(8, 6, generator=g) * 0.3, torch.randn(8, 6, generator=g) * 0.3
    mask = (torch.rand(8, 6, generator=g) > 0.2).float()
    full = m2_keep_mask(prox, roll, mask, 0.05)
    assert 0 < full.sum() < mask.sum()
    world, slots, barrier, out = 2, [None, None], threading.Barrier(2), [None, None]

    def all_reduce(t):
        i = barrier.wait()
        slots[i] = t.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        return total

    def rank(r):
        sl = slice(4 * r, 4 * r + 4)
        out[r] = m2_keep_mask(prox[sl], roll[sl], mask[sl], 0.05, all_reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(torch.cat(out), full)


def test_kl_and_staleness_buckets():
    prox = torch.tensor([[0.0, 0.0], [L(2.0), 0.0], [L(0.5), L(0.5)]])
    roll = torch.zeros(3, 2)
    kl = kl_behaviour_prox(prox, roll)  # r − 1 − log r
    torch.testing.assert_close(kl[1, 0], torch.tensor(1.0 - L(2.0)))
    torch.testing.assert_close(kl[2, 0], torch.tensor(-0.5 + L(2.0)))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    ratio = torch.exp(prox - roll)
    sums = mismatch_by_staleness({"ratio": ratio}, mask, torch.tensor([0, 2, 5]), max_bucket=2)
    # bucket 0: sample 0 (ratio 1); bucket 2: sample 1 (only its first token: 2) and sample 2 (clamped 5 -> 2: 0.5)
    assert float(sums["mismatch_sum/s0/n"]) == 1 and float(sums["mismatch_sum/s1/n"]) == 0
    means = bucket_means({k: float(v) for k, v in sums.items()} | {"loss": 3.0})
    assert means == {"loss": 3.0, "mismatch/s0/ratio": 1.0, "mismatch/s2/ratio": 1.25}


def test_staleness_weights():
    from streamrl.algos import staleness_weights

    torch.testing.assert_close(staleness_weights(torch.tensor([0, 1, 3]), 0.5), torch.tensor([1.0, 0.5, 0.125]))
    assert torch.equal(staleness_weights(torch.tensor([0, 4]), 1.0), torch.ones(2))
