"""Turn consumed groups into the trainer's batch: per-sample advantages (whole groups), staleness, one rank's slice.

The driver computes what needs whole groups (group-normalised rewards) before the batch is split over ranks;
everything that needs log-probs, reference log-probs or values (KL shaping, REINFORCE++ returns, PPO's GAE,
on-policy distillation, whitening) is computed per token in the trainer (`streamrl/train/step.py`).

`advantages` per estimator (slime's reward post-processing): grpo / gspo / cispo: (r − mean_g r) / (std_g r + 1e-6)
(`--disable-grpo-std-normalization`: mean only); reinforce_plus_plus_baseline: r − mean_g r; reinforce_plus_plus,
ppo: the raw reward r (the trainer places it on the last token); on_policy_distillation: 0 (the teacher is the
signal). `--disable-rewards-normalization` keeps the raw reward for every estimator.
"""

from __future__ import annotations

import argparse

import msgspec

from streamrl.types import Group


class TrainBatch(msgspec.Struct, kw_only=True):
    """One optimizer step's samples. Every list has one entry per sample; per-token lists have response_length."""

    tokens: list[list[int]]  # prompt + response ids
    prompt_lengths: list[int]
    response_lengths: list[int]  # >= 1: empty responses are given one masked EOS token by `build_train_batch`
    loss_masks: list[list[int]]  # 0 on tool tokens and on every token of a removed sample
    rollout_log_probs: list[list[float]]  # behaviour log-probs µ, per token, as recorded at generation
    advantages: list[float]  # per sample (see the module docstring); the trainer turns them into per-token ones
    rewards: list[float]  # raw rewards
    staleness: list[int]  # trainer version - oldest token version, per sample
    token_advantages: list[list[float]] | None = None  # per token, when the driver computed them (overrides)

    def __len__(self) -> int:
        return len(self.tokens)

    def shard(self, rank: int, world: int) -> TrainBatch:
        """Contiguous slice for data-parallel rank `rank` (sizes are checked equal by the config)."""
        n = len(self) // world
        sl = slice(rank * n, (rank + 1) * n)
        return TrainBatch(**{f: (v[sl] if v is not None else None)
                             for f in self.__struct_fields__ for v in [getattr(self, f)]})


def sample_advantages(args: argparse.Namespace, rewards: list[float]) -> list[float]:
    """Per-sample advantages of the estimator (module docstring); needs whole, contiguous groups."""
    import torch

    from streamrl.algos import grpo_advantages

    est = args.advantage_estimator
    if est == "on_policy_distillation":
        return [0.0] * len(rewards)
    if est in ("reinforce_plus_plus", "ppo"):
        return list(rewards)
    return grpo_advantages(
        torch.tensor(rewards, dtype=torch.float32),
        args.n_samples_per_prompt,
        std_normalize=not args.disable_grpo_std_normalization and est != "reinforce_plus_plus_baseline",
        normalize=not args.disable_rewards_normalization,
    ).tolist()


def build_train_batch(args: argparse.Namespace, groups: list[Group], version: int, eos_id: int) -> TrainBatch:
    samples = [s for g in groups for s in g]
    rewards = [s.get_reward_value(args.reward_key) for s in samples]
    out = TrainBatch(tokens=[], prompt_lengths=[], response_lengths=[], loss_masks=[], rollout_log_probs=[],
                     advantages=sample_advantages(args, rewards), rewards=rewards, staleness=[])
    for s in samples:
        tokens, r = list(s.tokens), s.response_length
        mask = list(s.loss_mask) if s.loss_mask is not None else [1] * r
        lps = list(s.rollout_log_probs) if s.rollout_log_probs is not None else [0.0] * r
        if r == 0:  # nothing generated (e.g. max_new_tokens 0): one masked token keeps shapes uniform
            tokens, r, mask, lps = tokens + [eos_id], 1, [0], [0.0]
        if s.remove_sample:  # slime: a removed sample stays in the batch (and in N) with an all-zero loss mask
            mask = [0] * r
        out.tokens.append(tokens)
        out.prompt_lengths.append(len(tokens) - r)
        out.response_lengths.append(r)
        out.loss_masks.append(mask)
        out.rollout_log_probs.append(lps)
        out.staleness.append(version - min(s.token_versions) if s.token_versions else 0)
    return out
