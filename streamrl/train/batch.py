"""Turn consumed groups into the trainer's batch: GRPO advantages (whole groups), staleness, one rank's slice.

Advantages are computed on the driver before the batch is split over ranks, because they need whole groups.
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
    loss_masks: list[list[int]]
    rollout_log_probs: list[list[float]]
    advantages: list[float]  # per sample, broadcast to its tokens
    rewards: list[float]
    staleness: list[int]  # trainer version - oldest token version, per sample

    def __len__(self) -> int:
        return len(self.tokens)

    def shard(self, rank: int, world: int) -> TrainBatch:
        """Contiguous slice for data-parallel rank `rank` (sizes are checked equal by the config)."""
        n = len(self) // world
        sl = slice(rank * n, (rank + 1) * n)
        return TrainBatch(**{f: getattr(self, f)[sl] for f in self.__struct_fields__})


def build_train_batch(args: argparse.Namespace, groups: list[Group], version: int, eos_id: int) -> TrainBatch:
    import torch

    from streamrl.algos import grpo_advantages

    samples = [s for g in groups for s in g]
    rewards = [s.get_reward_value(args.reward_key) for s in samples]
    adv = grpo_advantages(
        torch.tensor(rewards, dtype=torch.float32),
        args.n_samples_per_prompt,
        std_normalize=not args.disable_grpo_std_normalization,
        normalize=not args.disable_rewards_normalization,
    ).tolist()
    out = TrainBatch(tokens=[], prompt_lengths=[], response_lengths=[], loss_masks=[], rollout_log_probs=[],
                     advantages=adv, rewards=rewards, staleness=[])
    for s in samples:
        tokens, r = list(s.tokens), s.response_length
        mask = list(s.loss_mask) if s.loss_mask is not None else [1] * r
        lps = list(s.rollout_log_probs) if s.rollout_log_probs is not None else [0.0] * r
        if r == 0:  # nothing generated (e.g. max_new_tokens 0): one masked token keeps shapes uniform
            tokens, r, mask, lps = tokens + [eos_id], 1, [0], [0.0]
        out.tokens.append(tokens)
        out.prompt_lengths.append(len(tokens) - r)
        out.response_lengths.append(r)
        out.loss_masks.append(mask)
        out.rollout_log_probs.append(lps)
        out.staleness.append(version - min(s.token_versions) if s.token_versions else 0)
    return out
