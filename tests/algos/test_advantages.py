"""Advantage estimators against hand-computed numbers: REINFORCE++ (+baseline), GAE, whitening, OPD, driver side."""

from __future__ import annotations

import math

import pytest
import torch

from streamrl.algos import (
    discounted_returns,
    gae,
    kl_shaped_rewards,
    last_token_onehot,
    masked_whiten,
    opd_advantages,
    reinforce_pp_baseline,
)
from streamrl.config import default_args
from streamrl.train.batch import build_train_batch, sample_advantages
from streamrl.types import Sample

T = torch.tensor


def test_last_token_skips_tool_tokens_and_empty_samples():
    mask = T([[1, 1, 0, 1], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert last_token_onehot(mask).tolist() == [[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_reinforce_plus_plus_returns_by_hand():
    # sample 0: response of 4 tokens, token 2 is a tool token (mask 0); sample 1: 2 tokens + padding
    mask = T([[1.0, 1, 0, 1], [1, 1, 0, 0]])
    resp = T([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    kl = T([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 7.0, 7.0]])
    rho = kl_shaped_rewards(T([1.0, 0.0]), mask, kl, kl_coef=0.5)
    # ρ = −0.5·KL·m, plus the reward on the last trainable token
    torch.testing.assert_close(rho, T([[-0.05, -0.1, 0.0, 0.8], [-0.25, -0.25, 0.0, 0.0]]))
    g = discounted_returns(rho, resp, gamma=0.9)
    # G_3 = .8, G_2 = .9·.8, G_1 = −.1 + .9·.72, G_0 = −.05 + .9·.548 ; G_1 = −.25, G_0 = −.25 + .9·(−.25)
    torch.testing.assert_close(g, T([[0.4432, 0.548, 0.72, 0.8], [-0.475, -0.25, 0.0, 0.0]]))
    # γ = 1 and no KL: every token gets the outcome reward
    torch.testing.assert_close(discounted_returns(kl_shaped_rewards(T([1.0, 0.0]), mask), resp), resp * T([[1.0], [0]]))


def test_reinforce_plus_plus_baseline_by_hand():
    out = reinforce_pp_baseline(T([0.5, -0.5]), T([[1.0, 1], [1, 0]]), T([[0.2, 0.4], [0.6, 0.8]]), kl_coef=0.5)
    torch.testing.assert_close(out, T([[0.4, 0.3], [-0.8, 0.0]]))  # −0.5 − 0.5·0.6


def test_gae_by_hand_and_padding_ignored():
    rho = T([[0.0, 0.0, 1.0], [0.0, -1.0, 5.0]])
    values = T([[0.5, 0.6, 0.7], [0.2, 0.1, 9.0]])  # sample 1 has 2 response tokens: 5.0 and 9.0 are padding junk
    resp = T([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = gae(rho, values, resp, gamma=0.9, lambd=0.8)
    # δ = [.04, .03, .3], A_t = δ_t + .72·A_{t+1}; δ = [−.11, −1.1]
    torch.testing.assert_close(adv, T([[0.21712, 0.246, 0.3], [-0.902, -1.1, 0.0]]))
    torch.testing.assert_close(ret, T([[0.71712, 0.846, 1.0], [-0.702, -1.0, 0.0]]))
    # γ = λ = 1: Monte-Carlo return minus the value
    adv1, _ = gae(rho, values, resp)
    torch.testing.assert_close(adv1, T([[0.5, 0.4, 0.3], [-1.2, -1.1, 0.0]]))


def test_whitening_by_hand_and_across_ranks():
    v = T([[1.0, 2, 3], [4, 0, 9]])
    m = T([[1.0, 1, 1], [1, 0, 0]])
    std = math.sqrt(5 / 3 + 1e-8)  # tokens 1,2,3,4: mean 2.5, unbiased variance 5/3
    expected = T([[-1.5, -0.5, 0.5], [1.5, 0, 0]]) / std
    torch.testing.assert_close(masked_whiten(v, m), expected)
    # two ranks, one row each: the all-reduced statistics give the same result on each rank's rows
    stats = [torch.stack([(r * k).sum(), (r * r * k).sum(), k.sum()]).double() for r, k in zip(v, m, strict=True)]
    total = stats[0] + stats[1]
    for i in range(2):
        torch.testing.assert_close(masked_whiten(v[i : i + 1], m[i : i + 1], lambda s: total), expected[i : i + 1])
    with pytest.raises(ValueError):
        masked_whiten(v, torch.zeros_like(m))


def test_opd_by_hand():
    out = opd_advantages(T([[1.0, 1.0, 1.0]]), T([[-1.0, -2.0, -3.0]]), T([[-1.5, -1.0, 0.0]]), 0.5, T([[1.0, 1, 0]]))
    torch.testing.assert_close(out, T([[0.75, 1.5, 0.0]]))


@pytest.mark.parametrize(
    "estimator, extra, expected",
    [
        ("grpo", {}, [0.5, -1.5, 0.5, 0.5, -0.5, -0.5, -0.5, 1.5]),
        ("gspo", {"disable_grpo_std_normalization": True}, [0.25, -0.75, 0.25, 0.25, -0.25, -0.25, -0.25, 0.75]),
        ("reinforce_plus_plus_baseline", {"normalize_advantages": True},
         [0.25, -0.75, 0.25, 0.25, -0.25, -0.25, -0.25, 0.75]),
        ("reinforce_plus_plus", {"normalize_advantages": True}, [1, 0, 1, 1, 0, 0, 0, 1]),
        ("ppo", {}, [1, 0, 1, 1, 0, 0, 0, 1]),
        ("on_policy_distillation", {"opd_teacher_load": "t"}, [0] * 8),
        ("cispo", {"disable_rewards_normalization": True}, [1, 0, 1, 1, 0, 0, 0, 1]),
    ],
)
def test_driver_side_advantages_per_estimator(estimator, extra, expected):
    args = default_args(advantage_estimator=estimator, n_samples_per_prompt=4, **extra)
    out = sample_advantages(args, [1.0, 0, 1, 1, 0, 0, 0, 1])
    torch.testing.assert_close(T(out), T(expected, dtype=torch.float32), atol=1e-5, rtol=0)


def test_batch_keeps_behaviour_logprobs_of_partial_rollouts_and_masks_removed_samples():
    """A resumed partial rollout mixes versions: every token keeps the log-prob of the weights that sampled it."""
    a = Sample(tokens=[5, 6], reward=1.0)
    a.append_response_tokens(tokens=[7, 8], log_probs=[-0.1, -0.2], version=3, finish_reason="abort")
    a.append_response_tokens(tokens=[9], log_probs=None, version=4, trainable=False)  # tool output
    a.append_response_tokens(tokens=[10, 11], log_probs=[-0.3, -0.4], version=4, finish_reason="stop")
    b = Sample(tokens=[5, 6], reward=0.0, remove_sample=True)
    b.append_response_tokens(tokens=[7], log_probs=[-0.5], version=5, finish_reason="stop")
    args = default_args(n_samples_per_prompt=2, rollout_batch_size=1)
    batch = build_train_batch(args, [[a, b]], version=5, eos_id=2)
    assert batch.rollout_log_probs == [[-0.1, -0.2, 0.0, -0.3, -0.4], [-0.5]]
    assert batch.loss_masks == [[1, 1, 0, 1, 1], [0]]
    assert batch.staleness == [2, 0]
    assert batch.prompt_lengths == [2, 2] and batch.response_lengths == [5, 1]
    assert batch.advantages == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)])
    half = batch.shard(1, 2)
    assert half.tokens == [b.tokens] and half.token_advantages is None


def test_custom_reward_post_process_replaces_the_group_normalisation():
    """--custom-reward-post-process-path fn(args, samples) -> (raw_rewards, rewards): `rewards` become the per-sample
    advantages, `raw_rewards` the logged rewards; a wrong answer names the plug-in."""
    samples = []
    for r in (1.0, 0.0, 1.0, 1.0):
        s = Sample(tokens=[5, 6], reward=r)
        s.append_response_tokens(tokens=[7], log_probs=[-0.5], version=0, finish_reason="stop")
        samples.append(s)
    args = default_args(n_samples_per_prompt=2, rollout_batch_size=2, custom_reward_post_process_path="x.py:f")

    def mean_centred(args, samples):  # one baseline over the whole step instead of per group
        raw = [s.reward for s in samples]
        return raw, [r - sum(raw) / len(raw) for r in raw]

    batch = build_train_batch(args, [samples[:2], samples[2:]], version=0, eos_id=2, post_process=mean_centred)
    assert batch.rewards == [1.0, 0.0, 1.0, 1.0] and batch.advantages == [0.25, -0.75, 0.25, 0.25]
    with pytest.raises(ValueError, match="x.py:f returned 1 raw rewards and 1 rewards for 4 samples"):
        build_train_batch(args, [samples[:2], samples[2:]], 0, 2, post_process=lambda a, s: ([1.0], [1.0]))
    with pytest.raises(ValueError, match="x.py:f must return"):
        build_train_batch(args, [samples[:2], samples[2:]], 0, 2, post_process=lambda a, s: None)


def test_balance_data_partition_by_hand():
    """--balance-data: lengths [10, 1, 1, 10, 5, 5] on 2 ranks -> tokens 16/16 (contiguous slices: 12/20)."""
    from streamrl.train.batch import TrainBatch, balanced_partition

    assert balanced_partition([10, 1, 1, 10, 5, 5], 2) == [[0, 1, 4], [2, 3, 5]]
    assert balanced_partition([3, 3, 3, 3], 4) == [[0], [1], [2], [3]]
    lengths = [10, 1, 1, 10, 5, 5]
    resp = [n - 1 for n in lengths]
    batch = TrainBatch(tokens=[[7] * n for n in lengths], prompt_lengths=[1] * 6, response_lengths=resp,
                       loss_masks=[[1] * r for r in resp], rollout_log_probs=[[0.0] * r for r in resp],
                       advantages=[float(i) for i in range(6)], rewards=[0.0] * 6, staleness=[0] * 6)
    assert batch.shard(1, 2, balance=True).advantages == [2.0, 3.0, 5.0]
    assert batch.shard(1, 2).advantages == [3.0, 4.0, 5.0]


def test_grpo_leaves_failed_samples_out_of_the_group_baseline():
    from streamrl.algos.advantages import grpo_advantages
    from streamrl.types import Status

    r = torch.tensor([1.0, 0.0, 0.0, 5.0, 2.0, 2.0, 0.0, 1.0])  # 2 groups of 4
    valid = torch.tensor([True, True, True, False, True, False, False, False])
    adv = grpo_advantages(r, 4, valid=valid)
    # group 0 over its 3 valid rewards (1, 0, 0): mean 1/3, std (k-1) sqrt(1/3); the failed one gets 0.
    # group 1 has one valid sample: no baseline, all zeros.
    s = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv.tolist() == pytest.approx([(2 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6), 0,
                                          0, 0, 0, 0])
    assert grpo_advantages(r, 4, valid=torch.ones(8, dtype=torch.bool)).tolist() == pytest.approx(
        grpo_advantages(r, 4).tolist())  # all valid: the plain estimator
    plain = grpo_advantages(r, 4, std_normalize=False, valid=valid)
    assert plain[:3].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    # in a batch: a FAILED sample (reward None, emptied by the producers) is masked and left out of the baseline
    good = [Sample(tokens=[5, 6], reward=x) for x in (1.0, 0.0, 0.0)]
    for smp in good:
        smp.append_response_tokens(tokens=[7], log_probs=[-0.5], version=0, finish_reason="stop")
    bad = Sample(tokens=[5, 6], status=Status.FAILED, remove_sample=True)
    batch = build_train_batch(default_args(n_samples_per_prompt=4, rollout_batch_size=1), [[*good, bad]], version=0,
                              eos_id=2)
    assert batch.advantages == pytest.approx(adv[:4].tolist()) and batch.loss_masks[3] == [0]


def test_kl_penalty_falls_on_every_response_token_as_in_slime():
    # response of 3 tokens, the middle one tool output (mask 0), then padding; beta = 1, reward 1 on the last
    # trainable token: rho = [-0.1, -0.2, 1 - 0.3, 0] (slime penalises the tool token too; padding never)
    mask, resp = torch.tensor([[1.0, 0.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    rho = kl_shaped_rewards(torch.tensor([1.0]), mask, kl, 1.0, resp_mask=resp)
    assert rho[0].tolist() == pytest.approx([-0.1, -0.2, 0.7, 0.0])
    old = kl_shaped_rewards(torch.tensor([1.0]), mask, kl, 1.0)  # without resp_mask: the loss mask, as before
    assert old[0].tolist() == pytest.approx([-0.1, 0.0, 0.7, 0.0])
