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
from typing import Any

import msgspec
import torch
from transformers import AutoConfig

from streamrl.algos import grpo_advantages, rollout_mask_sums
from streamrl.types import Group, Status


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
    rollout_ids: list[int] | None = None  # slime's Sample.rollout_id, unique where unset; None: one per sample
    rollout_mask_sums: list[float] | None = None  # loss-mask total of each sample's rollout in its optimizer step

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, idx: list[int]) -> TrainBatch:
        return TrainBatch(**{f: ([v[i] for i in idx] if v is not None else None)
                             for f in self.__struct_fields__ for v in [getattr(self, f)]})

    def num_rollouts(self) -> int:
        """N of the sample-mean reduction: the rollouts of this batch (`reduce.py`)."""
        return len(set(self.rollout_ids)) if self.rollout_ids is not None else len(self)

    def mini_batches(self, k: int) -> list[TrainBatch]:
        """`k` equal contiguous parts (--num-mini-batches): one optimizer step each, the same parts on any number
        of ranks (each part is then sharded over the ranks). Each part carries its rollouts' loss-mask totals (the
        per-rollout denominators), computed here where every sample of the step is visible."""
        n = len(self) // k
        parts = [self.select(list(range(j * n, (j + 1) * n))) for j in range(k)]
        for p in parts:
            if p.rollout_ids is not None:
                p.rollout_mask_sums = rollout_mask_sums(p.rollout_ids, [float(sum(m)) for m in p.loss_masks])
        return parts

    def shard(self, rank: int, world: int, balance: bool = False) -> TrainBatch:
        """Data-parallel rank `rank`'s samples (sizes are checked equal by the config): a contiguous slice, or with
        `balance` (slime's --balance-data) the `balanced_partition` part, so that ranks get near-equal tokens."""
        n = len(self) // world
        if balance:
            idx = balanced_partition([len(t) for t in self.tokens], world)[rank]
        else:
            idx = list(range(rank * n, (rank + 1) * n))
        return self.select(idx)


def balanced_partition(lengths: list[int], world: int) -> list[list[int]]:
    """Sample indices in `world` parts of equal count and near-equal token totals: longest first, each to the part
    with the fewest tokens that still has room (ties: the lower rank); every part keeps the batch order. Every rank
    computes the same partition, so no communication is needed."""
    per = len(lengths) // world
    parts: list[list[int]] = [[] for _ in range(world)]
    tokens = [0] * world
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min((r for r in range(world) if len(parts[r]) < per), key=lambda r: (tokens[r], r))
        parts[k].append(i)
        tokens[k] += lengths[i]
    return [sorted(p) for p in parts]


def sample_advantages(args: argparse.Namespace, rewards: list[float], valid: list[bool] | None = None) -> list[float]:
    """Per-sample advantages of the estimator (module docstring); needs whole, contiguous groups. `valid`: False
    for a sample whose reward failed: left out of its group's baseline (and trained with a zero loss mask)."""
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
        valid=None if valid is None or all(valid) else torch.tensor(valid),
    ).tolist()


def post_processed_rewards(args: argparse.Namespace, samples: list, post_process: Any) -> tuple[list, list]:
    """slime's `--custom-reward-post-process-path fn(args, samples) -> (raw_rewards, rewards)`, checked: two lists
    of one number per sample (else a ValueError naming the plug-in)."""
    what = f"--custom-reward-post-process-path {args.custom_reward_post_process_path}"
    out = post_process(args, samples)
    try:
        raw, rewards = out
        raw, rewards = [float(x) for x in raw], [float(x) for x in rewards]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must return (raw_rewards, rewards), two lists of numbers: {e}") from None
    if len(raw) != len(samples) or len(rewards) != len(samples):
        raise ValueError(f"{what} returned {len(raw)} raw rewards and {len(rewards)} rewards for {len(samples)} "
                         "samples")
    return raw, rewards


def build_train_batch(args: argparse.Namespace, groups: list[Group], version: int, eos_id: int,
                      post_process: Any = None) -> TrainBatch:
    """The step's batch from whole groups; `post_process` (the loaded --custom-reward-post-process-path) replaces
    the built-in per-sample advantages (`sample_advantages`)."""
    samples = [s for g in groups for s in g]
    if post_process is not None:
        rewards, advantages = post_processed_rewards(args, samples, post_process)
    else:
        rewards = [0.0 if s.status == Status.FAILED else s.get_reward_value(args.reward_key) for s in samples]
        advantages = sample_advantages(args, rewards, [s.status != Status.FAILED for s in samples])
    out = TrainBatch(tokens=[], prompt_lengths=[], response_lengths=[], loss_masks=[], rollout_log_probs=[],
                     advantages=advantages, rewards=rewards, staleness=[])
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
    out.rollout_ids = rollout_ids([s.rollout_id for s in samples])
    return out


def rollout_ids(ids: list[int | None]) -> list[int] | None:
    """Each sample's rollout id: its own where a plug-in set one, else the smallest integer not yet used (slime's
    fallback: a rollout of its own); None when no sample has one (every sample is its own rollout)."""
    if all(i is None for i in ids):
        return None
    used, out, nxt = {i for i in ids if i is not None}, [], 0
    for i in ids:
        if i is None:
            while nxt in used:
                nxt += 1
            i = nxt
            used.add(i)
        out.append(i)
    return out


def eos_id(path: str) -> int:
    """The checkpoint's EOS token id (the first, if it lists several; 0 if none)."""

    eos = AutoConfig.from_pretrained(path).eos_token_id
    return eos[0] if isinstance(eos, list) else int(eos or 0)
