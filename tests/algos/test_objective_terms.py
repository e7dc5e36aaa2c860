"""The trainer's objective (streamrl/train/objective.py) on hand-built micro-batches: slime's `ois` metric and the
per-rollout loss denominators, values and gradients computed by hand; rollout ids through the batch."""

from __future__ import annotations

import math

import pytest
import torch

from streamrl.algos import LossReducer
from streamrl.config import default_args
from streamrl.train.batch import TrainBatch, rollout_ids
from streamrl.train.objective import MicroBatch, actor_loss

T = torch.tensor
L = math.log


def micro_batch(mask: torch.Tensor, adv: torch.Tensor, old: torch.Tensor, roll: torch.Tensor | None = None,
                **kw) -> MicroBatch:
    b, t = mask.shape
    return MicroBatch(tokens=[[1] * (t + 1)] * b, prompt_lengths=[1] * b, response_lengths=[t] * b,
                      resp_mask=torch.ones(b, t), mask=mask, rollout_log_probs=old.clone() if roll is None else roll,
                      sample_advantages=adv[:, 0], rewards=torch.zeros(b), advantages=adv, old_log_probs=old,
                      trainer_log_probs=old, **kw)


def test_ois_is_the_sample_mean_of_pi_theta_over_pi_old():
    # π_θ/π_old per token: sample 0: 1.2, 0.8 -> mean 1.0; sample 1: 1.5 and a masked token -> 1.5; (1 + 1.5) / 2
    old = T([[-1.0, -2.0], [-0.5, -1.0]])
    theta = old + torch.log(T([[1.2, 0.8], [1.5, 7.0]]))
    mb = micro_batch(T([[1.0, 1], [1, 0]]), torch.ones(2, 2), old)
    _, metrics = actor_loss(default_args(), mb, theta, None, LossReducer("sample_mean", 2))
    torch.testing.assert_close(metrics["ois"], T(1.25))
    # GSPO: the sequence-level ratio exp(mean_t(ℓθ − ℓold)) on every token
    _, metrics = actor_loss(default_args(advantage_estimator="gspo"), mb, theta, None, LossReducer("sample_mean", 2))
    torch.testing.assert_close(metrics["ois"], T((math.sqrt(1.2 * 0.8) + 1.5) / 2))


def test_actor_loss_per_rollout_denominators_values_and_gradient():
    """Samples 0 and 1 are one rollout (2 + 1 loss tokens: D = 3), sample 2 is one of its own (D = 2); N = 2.

    With ℓθ = ℓold (ρ = 1) the per-token loss is −A, so L = (1/2)·[(−1 − 2 − 3)/3 + (−4 − 5)/2] and
    ∂L/∂ℓθ_it = −A_it·m_it / (D_i·N).
    """
    old = torch.zeros(3, 2)
    theta = old.clone().requires_grad_()
    mask = T([[1.0, 1], [1, 0], [1, 1]])
    adv = T([[1.0, 2], [3, 9], [4, 5]])
    mb = micro_batch(mask, adv, old, rollout_mask_sums=T([3.0, 3.0, 2.0]))
    loss, metrics = actor_loss(default_args(), mb, theta, None, LossReducer("sample_mean", 2))
    torch.testing.assert_close(loss, T(0.5 * (-6 / 3 - 9 / 2)))
    loss.backward()
    torch.testing.assert_close(theta.grad, -adv * mask / (T([[3.0], [3.0], [2.0]]) * 2))
    # metrics use the same denominators: ois = 1 everywhere -> (3/3 + 2/2) / 2
    torch.testing.assert_close(metrics["ois"], T(1.0))


def test_rollout_ids_fallback_and_mini_batch_denominators():
    # slime's fallback: an unset id becomes the smallest integer no sample uses
    assert rollout_ids([None, 0, None, 0, 2]) == [1, 0, 3, 0, 2]
    assert rollout_ids([None, None]) is None
    batch = TrainBatch(tokens=[[1, 2]] * 4, prompt_lengths=[1] * 4, response_lengths=[1] * 4,
                       loss_masks=[[1, 1], [1, 0], [0, 0], [1, 1]], rollout_log_probs=[[0.0]] * 4,
                       advantages=[0.0] * 4, rewards=[0.0] * 4, staleness=[0] * 4, rollout_ids=[7, 7, 7, 8])
    assert batch.num_rollouts() == 2
    (one,) = batch.mini_batches(1)
    assert one.rollout_mask_sums == [3.0, 3.0, 3.0, 2.0]
    # two optimizer steps: each step's denominators and N are its own samples'
    first, second = batch.mini_batches(2)
    assert first.rollout_mask_sums == [3.0, 3.0] and first.num_rollouts() == 1
    assert second.rollout_mask_sums == [0.0, 2.0] and second.num_rollouts() == 2
    assert second.shard(1, 2).rollout_mask_sums == [2.0]
    # without ids every sample is its own rollout
    plain = TrainBatch(**{**{f: getattr(batch, f) for f in batch.__struct_fields__}, "rollout_ids": None})
    assert plain.num_rollouts() == 4 and plain.mini_batches(1)[0].rollout_mask_sums is None


@pytest.mark.parametrize("per_token", [False, True])
def test_one_sample_per_rollout_changes_nothing(per_token):
    old = torch.zeros(2, 2)
    mask = T([[1.0, 1], [1, 0]])
    adv = T([[1.0, 2], [3, 4]])
    reduce = LossReducer("token_mean", 2, 3.0) if per_token else LossReducer("sample_mean", 2)
    args = default_args(calculate_per_token_loss=per_token)
    plain, _ = actor_loss(args, micro_batch(mask, adv, old), old.clone(), None, reduce)
    own, _ = actor_loss(args, micro_batch(mask, adv, old, rollout_mask_sums=mask.sum(-1)), old.clone(), None,
                        reduce)
    torch.testing.assert_close(own, plain)


def test_opsm_in_the_objective_values_and_gradient():
    """δ = 0.05; both samples moved by ℓold − ℓθ = (0.2, 0): KL estimate 0.1 > δ. Sample 0 (A = −1) is dropped,
    sample 1 (A = +1) stays: L = (1/2)·(−(e^-0.2 + 1)/2), ∂L/∂ℓθ_1t = −ρ_t/4 (e^-0.2 = 0.82 is inside the clip)."""
    old = torch.zeros(2, 2)
    theta = (old - T([[0.2, 0.0], [0.2, 0.0]])).requires_grad_()
    mb = micro_batch(torch.ones(2, 2), T([[-1.0, -1], [1, 1]]), old)
    loss, metrics = actor_loss(default_args(use_opsm=True, opsm_delta=0.05), mb, theta, None,
                               LossReducer("sample_mean", 2))
    rho = math.exp(-0.2)
    torch.testing.assert_close(loss, T(-(rho + 1) / 4))
    loss.backward()
    torch.testing.assert_close(theta.grad, T([[0.0, 0.0], [-rho / 4, -1 / 4]]))
    torch.testing.assert_close(metrics["opsm_clipfrac"], T(0.5))
    # below the threshold nothing is dropped
    loss, metrics = actor_loss(default_args(use_opsm=True, opsm_delta=0.2), mb, theta.detach(), None,
                               LossReducer("sample_mean", 2))
    assert metrics["opsm_clipfrac"].item() == 0.0
    torch.testing.assert_close(loss, T(0.0))  # (ρ + 1)/2 · (+1) + (−(ρ + 1)/2) over 2 samples


def test_mis_in_the_objective_values_and_gradient():
    """slime's mis.yaml recipe as flags (token TIS at 2, --use-rs in [0.5, 2], veto 1e-4, batch normalisation), on
    the numbers of tests/algos/test_rejection.py: sample 0 keeps its 0.5 and 1.5, sample 1 is vetoed."""
    args = default_args(use_rs=True, rs_lower_bound=0.5, rs_veto_threshold=1e-4, tis_batch_normalize=True)
    assert args.use_tis and args.rs_upper_bound == 2.0
    old = torch.log(T([[3.0, 0.5, 1.5], [1.0, 1e-5, 1.2]]))
    theta = old.clone().requires_grad_()
    mb = micro_batch(torch.ones(2, 3), T([[1.0] * 3, [-1.0] * 3]), old, roll=torch.zeros(2, 3))
    loss, metrics = actor_loss(args, mb, theta, None, LossReducer("sample_mean", 2))
    mean = (2 + 0.5 + 1.5 + 1 + 1e-5 + 1.2) / 6
    torch.testing.assert_close(loss, T(-(0.5 + 1.5) / mean / 6))
    loss.backward()
    torch.testing.assert_close(theta.grad, T([[0.0, -0.5, -1.5], [0.0, 0.0, 0.0]]) / mean / 6)
    torch.testing.assert_close(metrics["tis_rejected_frac"], T((1 / 3 + 1) / 2))
    torch.testing.assert_close(metrics["mis_batch_norm_factor"], T(mean))
    torch.testing.assert_close(metrics["mis_rs_catastrophic_seq_fraction"], T(0.5))
