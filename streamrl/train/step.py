"""One training step on one data-parallel rank, without torch.distributed: the FSDP actor (fsdp.py) supplies the
models and a cross-rank `all_reduce`; tests run several "ranks" in threads with an in-process all_reduce.

    split into micro-batches ─> prepare (no grad: ℓold, ℓref, ℓteacher, V_old, when needed up front)
      ─> advantages (per token; whitening and the token count are all-reduced over ranks)
      ─> actor: per micro-batch forward ℓθ, loss (loss.py), backward(loss·W)     ─> critic: same with the value loss

Why ℓold is computed up front only sometimes: with one optimizer step per batch the weights have not moved when a
micro-batch is first run, so ℓold equals the detached ℓθ of that same forward (slime's can_reuse_log_probs): one
forward instead of two. Estimators that need ℓold to BUILD the advantages (KL shaping, on-policy distillation, a
custom advantage function) and `--true-on-policy-mode` compute it first, in the same micro-batches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from streamrl.algos import (
    LossReducer,
    discounted_returns,
    expand_to_tokens,
    gae,
    kl_estimate,
    kl_shaped_rewards,
    m2_keep_mask,
    masked_whiten,
    opd_advantages,
    reinforce_pp_baseline,
    response_log_probs,
    token_count,
)
from streamrl.algos.offpolicy import to_list, to_padded
from streamrl.train.batch import TrainBatch
from streamrl.train.critic import response_values
from streamrl.train.objective import MicroBatch, actor_loss, critic_loss
from streamrl.train.packed import packed_response_log_probs, packed_response_values

AllReduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def _pad(rows: list[list[float]] | list[list[int]], b: int, t: int) -> Tensor:
    out = torch.zeros(b, t)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def token_budget_groups(lengths: list[int], max_tokens: int, min_groups: int = 0, packed: bool = False
                        ) -> list[list[int]]:
    """`--use-dynamic-batch-size`: sample indices in micro-batches whose size stays within `max_tokens`
    (`--max-tokens-per-gpu`): padded, samples x longest sequence, filled longest first so that similar lengths share
    a micro-batch and little is padding; `packed` (--qkv-format thd), the sum of the lengths, each sample into the
    first micro-batch with room (first-fit decreasing). A sample longer than the budget gets a micro-batch of its
    own. `min_groups`: split the largest micro-batches until there are that many (every FSDP rank must run the same
    number of forwards)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        if packed:
            k = next((k for k, load in enumerate(loads) if load + lengths[i] <= max_tokens), None)
        else:  # the group's first sample is its longest
            k = len(groups) - 1 if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens else None
        if k is None:
            groups.append([i])
            loads.append(lengths[i])
        else:
            groups[k].append(i)
            loads[k] += lengths[i]
    if min_groups > len(lengths):
        raise ValueError(f"{min_groups} micro-batches asked of {len(lengths)} samples")
    while len(groups) < min_groups:
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups[k]
        groups[k: k + 1] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups


def micro_batches(local: TrainBatch, size: int, device: torch.device | str | None = None,
                  max_tokens: int | None = None, min_micro_batches: int = 0, packed: bool = False
                  ) -> list[MicroBatch]:
    """Micro-batches as padded tensors (T = the micro-batch's longest response): contiguous runs of `size` samples,
    or with `max_tokens` grouped by token budget (`token_budget_groups`; `packed`: the budget counts real tokens).
    Every loss is a sum over global constants, so how samples are grouped does not change the step's gradient
    (tests/algos/test_invariance.py)."""
    if max_tokens:
        groups = token_budget_groups([p + r for p, r in zip(local.prompt_lengths, local.response_lengths,
                                                             strict=True)], max_tokens, min_micro_batches, packed)
    else:
        groups = [list(range(s, min(s + size, len(local)))) for s in range(0, len(local), size)]
    out: list[MicroBatch] = []
    for idx in groups:
        def pick(field, idx=idx):
            return [field[i] for i in idx]

        rlen = pick(local.response_lengths)
        b, t = len(rlen), max(max(rlen), 1)
        resp = (torch.arange(t).unsqueeze(0) < torch.tensor(rlen).unsqueeze(1)).float()
        tok_adv = pick(local.token_advantages) if local.token_advantages is not None else None
        out.append(MicroBatch(
            tokens=pick(local.tokens), prompt_lengths=pick(local.prompt_lengths), response_lengths=rlen,
            resp_mask=resp, mask=_pad(pick(local.loss_masks), b, t) * resp,
            rollout_log_probs=_pad(pick(local.rollout_log_probs), b, t),
            sample_advantages=torch.tensor(pick(local.advantages), dtype=torch.float32),
            rewards=torch.tensor(pick(local.rewards), dtype=torch.float32),
            staleness=torch.tensor(pick(local.staleness), dtype=torch.long),
            token_advantages=_pad(tok_adv, b, t) * resp if tok_adv is not None else None,
            rollout_mask_sums=(torch.tensor(pick(local.rollout_mask_sums), dtype=torch.float32)
                               if local.rollout_mask_sums is not None else None),
        ))
    if device is not None:
        for mb in out:
            for k, v in vars(mb).items():
                if isinstance(v, Tensor):
                    setattr(mb, k, v.to(device))
    return out


class StepRunner:
    """Holds the models of one rank and runs the parts of a step; see the module docstring."""

    def __init__(self, args: argparse.Namespace, model: Any, *, ref_model: Any = None, teacher: Any = None,
                 critic: Any = None, pad_id: int = 0, world: int = 1, all_reduce: AllReduce = _identity,
                 tis_fn: Any = None, custom_loss_fn: Any = None, custom_adv_fn: Any = None,
                 replay_fn: Callable[..., Tensor] | None = None, packed: bool | None = None):
        self.args, self.model, self.ref_model, self.teacher, self.critic = args, model, ref_model, teacher, critic
        self.pad_id, self.world, self.all_reduce = pad_id, world, all_reduce
        self.packed = args.qkv_format == "thd" if packed is None else packed  # the rank may run thd padded
        self.tis_fn, self.custom_loss_fn, self.custom_adv_fn, self.replay_fn = (tis_fn, custom_loss_fn,
                                                                                custom_adv_fn, replay_fn)

    # ------------------------------------------------------------------ helpers
    def log_probs(self, model: Any, mb: MicroBatch, with_entropy: bool = False, entropy_grad: bool = True):
        if self.packed:  # --qkv-format thd: one stream, no padding (packed.py)
            return packed_response_log_probs(model, mb.tokens, mb.prompt_lengths, mb.response_lengths,
                                             temperature=self.args.rollout_temperature, with_entropy=with_entropy,
                                             entropy_grad=entropy_grad)
        return response_log_probs(model, mb.tokens, mb.prompt_lengths, mb.response_lengths,
                                  temperature=self.args.rollout_temperature, pad_id=self.pad_id,
                                  with_entropy=with_entropy, entropy_grad=entropy_grad)

    def values(self, mb: MicroBatch) -> Tensor:
        """The critic's V [B, T] of the micro-batch's response tokens."""
        if self.packed:
            return packed_response_values(self.critic, mb.tokens, mb.prompt_lengths, mb.response_lengths)[0]
        return response_values(self.critic, mb.tokens, mb.prompt_lengths, mb.response_lengths, self.pad_id)[0]

    def needs_old_up_front(self) -> bool:
        a = self.args
        return bool(a.true_on_policy_mode or a.kl_coef > 0 or a.use_opd or self.custom_adv_fn is not None
                    or a.advantage_estimator == "on_policy_distillation" or a.num_mini_batches > 1
                    or a.m2_threshold is not None)

    def apply_m2(self, mbs: list[MicroBatch]) -> None:
        """--m2-threshold: the M2 trust region over the whole step's batch (every mini-batch, every rank)."""
        a = self.args
        if a.m2_threshold is None:
            return
        t = max(mb.mask.shape[1] for mb in mbs)

        def cat(key: str) -> Tensor:
            return torch.cat([torch.nn.functional.pad(getattr(mb, key), (0, t - mb.mask.shape[1])) for mb in mbs])

        keep = m2_keep_mask(cat("trainer_log_probs"), cat("rollout_log_probs"), cat("mask"), a.m2_threshold,
                            self.all_reduce)
        for mb, chunk in zip(mbs, keep.split([len(mb) for mb in mbs]), strict=True):
            mb.offpolicy_keep = chunk[:, : mb.mask.shape[1]]

    def reducer(self, mbs: list[MicroBatch], num_samples: int) -> LossReducer:
        """The reduction of this step; the token count is all-reduced over ranks before any loss is computed."""
        a = self.args
        if a.calculate_per_token_loss:
            ntok = self.all_reduce(torch.stack([token_count(mb.mask) for mb in mbs]).sum().double().reshape(1))
            return LossReducer("token_mean", num_samples, float(ntok.item()))
        if a.loss_normalizer_constant is not None:
            return LossReducer("constant", num_samples, constant=a.loss_normalizer_constant)
        return LossReducer("sample_mean", num_samples)

    # ------------------------------------------------------------------ prepare + advantages
    def prepare(self, mbs: list[MicroBatch]) -> None:
        """No-grad forwards whose results the advantages or the loss need before the actor's micro-batch loop."""
        a = self.args
        with torch.no_grad():
            for mb in mbs:
                if a.true_on_policy_mode and self.replay_fn is not None:
                    mb.trainer_log_probs = self.replay_fn(self.model, mb.tokens, mb.prompt_lengths,
                                                          mb.response_lengths, a.rollout_temperature
                                                          ).to(mb.mask.device)
                elif self.needs_old_up_front():
                    mb.trainer_log_probs = self.log_probs(self.model, mb).log_probs
                if a.use_rollout_logprobs:
                    mb.old_log_probs = mb.rollout_log_probs
                elif mb.trainer_log_probs is not None:
                    mb.old_log_probs = mb.trainer_log_probs
                if self.ref_model is not None:
                    mb.ref_log_probs = self.log_probs(self.ref_model, mb).log_probs
                if self.teacher is not None:
                    mb.teacher_log_probs = self.log_probs(self.teacher, mb).log_probs
                if self.critic is not None:

                    mb.values = self.values(mb)

    def compute_advantages(self, mbs: list[MicroBatch]) -> None:
        """Per-token advantages (and returns) for every micro-batch of this rank, per --advantage-estimator."""
        a = self.args
        if self.custom_adv_fn is not None:
            return self._custom_advantages(mbs)
        est = a.advantage_estimator
        for mb in mbs:
            # the student's log-probs for KL shaping and distillation: the trainer's own (π_prox), also when the
            # PPO anchor is µ (--use-rollout-logprobs, the default correction)
            student = mb.trainer_log_probs if mb.trainer_log_probs is not None else mb.old_log_probs
            kl = None
            if a.kl_coef > 0:
                kl = kl_estimate(student, mb.ref_log_probs, a.kl_loss_type) * mb.mask
            if mb.token_advantages is not None:
                adv = mb.token_advantages * mb.mask
            elif est in ("grpo", "gspo", "cispo"):
                adv = expand_to_tokens(mb.sample_advantages, mb.mask)
            elif est == "reinforce_plus_plus_baseline":
                adv = reinforce_pp_baseline(mb.sample_advantages, mb.mask, kl, a.kl_coef)
            elif est == "reinforce_plus_plus":
                rho = kl_shaped_rewards(mb.sample_advantages, mb.mask, kl, a.kl_coef, resp_mask=mb.resp_mask)
                adv = discounted_returns(rho, mb.resp_mask, a.gamma) * mb.mask
            elif est == "ppo":
                rho = kl_shaped_rewards(mb.sample_advantages, mb.mask, kl, a.kl_coef, resp_mask=mb.resp_mask)
                adv, mb.returns = gae(rho, mb.values, mb.resp_mask, a.gamma, a.lambd)
            elif est == "on_policy_distillation":
                adv = torch.zeros_like(mb.mask)
            else:
                raise ValueError(f"unknown advantage estimator {est!r}")
            if a.use_opd or est == "on_policy_distillation":
                adv = opd_advantages(adv, student, mb.teacher_log_probs, a.opd_kl_coef, mb.mask)
            mb.advantages = adv
            if mb.returns is None:
                mb.returns = adv
        if a.normalize_advantages:
            self._whiten(mbs)

    def _whiten(self, mbs: list[MicroBatch]) -> None:
        t = max(mb.mask.shape[1] for mb in mbs)
        pad = [(0, t - mb.mask.shape[1]) for mb in mbs]
        adv = torch.cat([torch.nn.functional.pad(mb.advantages, p) for mb, p in zip(mbs, pad, strict=True)])
        mask = torch.cat([torch.nn.functional.pad(mb.mask, p) for mb, p in zip(mbs, pad, strict=True)])
        white = masked_whiten(adv, mask, self.all_reduce)
        for mb, chunk in zip(mbs, white.split([len(mb) for mb in mbs]), strict=True):
            mb.advantages = chunk[:, : mb.mask.shape[1]]

    def _custom_advantages(self, mbs: list[MicroBatch]) -> None:
        """slime's `fn(args, rollout_data)`: per-sample [r_i] tensors in, rollout_data['advantages'/'returns'] out."""

        def lists(key: str) -> list[Tensor] | None:
            xs = [getattr(mb, key) for mb in mbs]
            if any(x is None for x in xs):
                return None
            return [row for mb, x in zip(mbs, xs, strict=True) for row in to_list(x, mb.response_lengths)]

        rlen = [r for mb in mbs for r in mb.response_lengths]
        data = {
            "tokens": [torch.tensor(t) for mb in mbs for t in mb.tokens], "response_lengths": rlen,
            "total_lengths": [len(t) for mb in mbs for t in mb.tokens], "loss_masks": lists("mask"),
            "rewards": [float(x) for mb in mbs for x in mb.sample_advantages],
            "raw_reward": [float(x) for mb in mbs for x in mb.rewards], "log_probs": lists("old_log_probs"),
            "rollout_log_probs": lists("rollout_log_probs"), "ref_log_probs": lists("ref_log_probs"),
            "teacher_log_probs": lists("teacher_log_probs"), "values": lists("values"),
        }
        self.custom_adv_fn(self.args, data)
        offset = 0
        for mb in mbs:
            n = len(mb)
            for key, dst in (("advantages", "advantages"), ("returns", "returns")):
                rows = data[key][offset : offset + n]
                setattr(mb, dst, to_padded(torch.cat([torch.as_tensor(r, dtype=torch.float32) for r in rows]),
                                           mb.response_lengths, mb.mask) * mb.mask)
            offset += n

    # ------------------------------------------------------------------ backward passes
    def actor_backward(self, mbs: list[MicroBatch], reduce: LossReducer) -> dict[str, Tensor]:
        """Forward ℓθ and backward loss·W for every micro-batch (gradients accumulate); returns metric sums."""
        sums: dict[str, Tensor] = {}
        coef = self.args.entropy_coef
        for mb in mbs:
            out = self.log_probs(self.model, mb, with_entropy=True, entropy_grad=bool(coef))
            loss, metrics = actor_loss(self.args, mb, out.log_probs, out.entropy, reduce, self.tis_fn,
                                       self.custom_loss_fn)
            (loss * self.world).backward()
            _accumulate(sums, metrics)
        return sums

    def actor_steps(self, per_part: list[list[MicroBatch]], part_sizes: list[int], opt_step: Callable[[], None]
                    ) -> dict[str, Tensor]:
        """--num-mini-batches: for each part, backward over its micro-batches then `opt_step()` (clip, step,
        zero the gradients). ℓold was fixed for every part by `prepare`, so from the second part on ρ = πθ/π_prox
        ≠ 1 and the clip bounds the update. Returns the metric sums over all parts (each part's in its own units:
        divide the mean metrics by the number of parts)."""
        sums: dict[str, Tensor] = {}
        for mbs, n in zip(per_part, part_sizes, strict=True):
            _accumulate(sums, self.actor_backward(mbs, self.reducer(mbs, n)))
            opt_step()
        return sums

    def critic_backward(self, mbs: list[MicroBatch], reduce: LossReducer) -> dict[str, Tensor]:

        sums: dict[str, Tensor] = {}
        for mb in mbs:
            values = self.values(mb)
            loss, metrics = critic_loss(self.args, mb, values, reduce)
            (loss * self.world).backward()
            _accumulate(sums, metrics)
        return sums


def _accumulate(sums: dict[str, Tensor], metrics: dict[str, Tensor]) -> None:
    for k, v in metrics.items():
        v = v.detach().double().reshape(())
        sums[k] = sums[k] + v if k in sums else v


def staleness_histogram(staleness: list[int], max_staleness: int) -> dict[str, float]:
    """{"staleness_hist/k": fraction of the step's samples whose oldest token is k versions old}, k = 0..max."""
    top = max([max_staleness, *staleness]) if staleness else max_staleness
    n = max(len(staleness), 1)
    return {f"staleness_hist/{k}": sum(s == k for s in staleness) / n for k in range(top + 1)}
