"""The trainer's loss for one micro-batch: the decoupled three-policy objective, and the critic's value loss.

Three policies per response token t of sample i (docs/design.md; docs/offpolicy.md):

* behaviour µ: the policy that sampled the token. Its log-prob ℓroll = log µ(y_t | y_<t) is recorded by the engine
  at sampling time (`rollout_log_probs`), per token; a partial rollout resumed after a weight update keeps the
  log-probs of each segment under the weights that generated it, so µ is a per-token mixture of versions and is
  still exactly the sampling distribution of every token.
* proximal π_old: the trainer's weights at the start of the step; ℓold is recomputed by the trainer (or, with one
  optimizer step per batch and nothing needing it up front, taken as the detached ℓθ of the same forward, which
  has the same value). `--use-rollout-logprobs` sets ℓold = ℓroll; `--true-on-policy-mode` recomputes it through
  the engine's own decode path (`onpolicy.py`).
* current π_θ: the weights being optimised, ℓθ with gradient.

The objective (to minimise), summed with the reduction R of `streamrl/algos/reduce.py`:

    L = R( w_t · L_pg(ρ_t, A_t) ) + β·R( KL(π_θ ‖ π_ref)_t ) − c_H·R( H_t )
    ρ_t = π_θ / π_old = exp(ℓθ − ℓold)                       (the PPO trust region is anchored at π_old)
    w_t = f(π_old / µ) = f(exp(ℓold − ℓroll)), detached      (off-policy correction, `algos/offpolicy.py`)

L_pg is the PPO clip (GRPO / PPO / REINFORCE++, with clip-higher and dual clip), GSPO (sequence-level ρ) or CISPO.
The gradient is E_µ[ w · ∇ min(ρA, clip(ρ)A) ] = E_{π_old}[ ∇ min(ρA, clip(ρ)A) ] when w is not truncated: the
decoupled PPO objective (Hilton et al. 2022) with π_old as proximal policy. Because ∇ρ = ρ∇ℓθ and ρ = 1 at the
start of the step, its first gradient is the plain importance-weighted policy gradient E_µ[(π_old/µ)·A·∇ℓθ].
Without w (no correction) the same estimator is biased by the staleness; the config refuses that for
--max-staleness > 0 unless --allow-uncorrected-offpolicy.

What w does not give is a trust region: with one optimizer step per batch ρ ≡ 1 when each token is first seen,
so nothing stops the trainer from pushing further a token whose probability already rose since µ sampled it.
`--use-rollout-logprobs` (ℓold = ℓroll) anchors ρ and its clip at µ instead, which zeroes exactly those tokens;
it is the default correction (no TIS flag given). `--num-mini-batches` > 1 makes the π_old clip a trust region
(decoupled PPO); `--m2-threshold` drops the tokens with the largest (ℓprox − ℓµ)² (`algos/corrections.py`). What
each of them keeps of sync's gain per staleness bound: docs/offpolicy.md.

Tokens that the off-policy function rejects (mask mode, --use-rs rejection sampling, the --rs-veto-threshold veto,
custom functions) leave the numerators of every term but keep their place in the denominators; --tis-batch-normalize
rescales w to mean 1 over the micro-batch (`algos/rejection.py`, slime's MIS example). --use-opsm drops the
negative-advantage tokens of samples that π_θ has moved away from (mean_t(ℓold − ℓθ) > --opsm-delta) from the
policy term only (slime's `compute_opsm_mask`). Samples a plug-in marked as one rollout (`Sample.rollout_id`) share
one denominator and count once (`reduce.py`). Metrics are reduced over the original masks; `ois` = π_θ/π_old.

Custom loss (`--loss-type custom_loss --custom-loss-function-path`): `fn(args, batch, reduce) -> (loss, metrics)`
where `batch` has [B, T] tensors `log_probs` (ℓθ, with grad), `old_log_probs`, `rollout_log_probs`,
`ref_log_probs` / `teacher_log_probs` (or None), `advantages`, `returns`, `loss_masks`, `entropy` (with grad), and
lists `tokens`, `prompt_lengths`, `response_lengths`; `reduce(values, mask)` is the configured reduction R. `loss`
must be in R's units (the trainer scales it by the world size), `metrics` maps names to per-token [B, T] tensors
(reduced by the trainer) or to scalars already in R's units.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from streamrl.algos import (
    LossReducer,
    call_tis_function,
    kl_behaviour_prox,
    kl_estimate,
    mis_weights,
    mismatch_by_staleness,
    opsm_keep,
    pg_loss,
    staleness_weights,
    value_loss,
)

PG_KIND = {"gspo": "gspo", "cispo": "cispo"}  # every other estimator uses the PPO clip


@dataclass
class MicroBatch:
    """One micro-batch as padded [B, T] tensors (T = longest response), plus what the step computes for it."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    response_lengths: list[int]
    resp_mask: Tensor  # 1 on the r_i real response tokens
    mask: Tensor  # loss mask: resp_mask with tool tokens / removed samples zeroed
    rollout_log_probs: Tensor  # ℓroll (µ)
    sample_advantages: Tensor  # [B] from the driver (group-normalised rewards, per estimator)
    rewards: Tensor  # [B] raw rewards
    staleness: Tensor | None = None  # [B] trainer version − oldest token version
    offpolicy_keep: Tensor | None = None  # [B, T] 0 on tokens the M2 trust region drops (--m2-threshold)
    token_advantages: Tensor | None = None  # [B, T] from the driver, when it computed them
    rollout_mask_sums: Tensor | None = None  # [B] D_i: the loss-mask total of sample i's rollout (None: its own)
    old_log_probs: Tensor | None = None  # ℓold when known before the loop
    trainer_log_probs: Tensor | None = None  # the trainer's own ℓ at the start of the step (for the mismatch metric)
    ref_log_probs: Tensor | None = None
    teacher_log_probs: Tensor | None = None
    values: Tensor | None = None  # V_old (critic, before its update)
    advantages: Tensor | None = None
    returns: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)


def denominators(mb: MicroBatch) -> Tensor:
    """What every term's sample-mean reduction divides by: the per-rollout mask totals when samples were grouped
    into rollouts, else each sample's original loss mask (masking tokens later never re-weights the rest)."""
    return mb.rollout_mask_sums if mb.rollout_mask_sums is not None else mb.mask


def actor_loss(
    args: argparse.Namespace,
    mb: MicroBatch,
    log_probs: Tensor,
    entropy: Tensor | None,
    reduce: LossReducer,
    tis_fn: Any = None,
    custom_loss_fn: Any = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss in R's units, {metric: value in R's units}) for one micro-batch; `log_probs` is ℓθ with grad."""
    mask, roll = mb.mask, mb.rollout_log_probs
    den = denominators(mb)
    old = mb.old_log_probs if mb.old_log_probs is not None else log_probs.detach()
    trainer_lp = mb.trainer_log_probs if mb.trainer_log_probs is not None else log_probs.detach()
    per_token: dict[str, Tensor] = {"train_rollout_logprob_abs_diff": (trainer_lp - roll).abs()}
    if args.loss_type == "sft_loss":
        per_token["logp"] = log_probs.detach()
        loss = reduce(-log_probs, mask, den)
        return loss, {**reduce.metrics(per_token, mask, den), "loss": loss.detach()}
    if args.loss_type == "custom_loss":
        batch = {
            "log_probs": log_probs, "old_log_probs": old, "rollout_log_probs": roll, "ref_log_probs": mb.ref_log_probs,
            "teacher_log_probs": mb.teacher_log_probs, "advantages": mb.advantages, "returns": mb.returns,
            "loss_masks": mask, "entropy": entropy, "tokens": mb.tokens, "prompt_lengths": mb.prompt_lengths,
            "response_lengths": mb.response_lengths,
        }
        loss, custom = custom_loss_fn(args, batch, lambda v, m: reduce(v, m, den))
        out = reduce.metrics(per_token, mask, den)
        for k, v in custom.items():
            v = torch.as_tensor(v)
            out[k] = v.detach() if v.dim() == 0 else reduce(v.detach(), mask, den)
        return loss, {**out, "loss": loss.detach()}

    pg, clipfrac, ppo_kl = pg_loss(PG_KIND.get(args.advantage_estimator, "ppo"), log_probs, old, mb.advantages, mask,
                                   eps_clip=args.eps_clip, eps_clip_high=args.eps_clip_high,
                                   eps_clip_c=args.eps_clip_c)
    # ois = π_θ/π_old (slime's metric; for gspo the sequence-level ratio): how far this forward has moved
    per_token.update(pg_clipfrac=clipfrac, ppo_kl=ppo_kl, ois=torch.exp(-ppo_kl))
    if args.use_opsm:  # slime applies it to the policy term only, before the off-policy weights
        opsm, per_token["opsm_clipfrac"] = opsm_keep(log_probs, old, mb.advantages, mask, args.opsm_delta)
        pg = pg * opsm
    num_mask = mask
    # from the trainer's own ℓ (= ℓold unless --use-rollout-logprobs): the metrics measure π_prox/µ either way
    w, tis_mask, tis_metrics = mis_weights(trainer_lp, roll, mask, level=args.tis_level, mode=args.tis_mode,
                                           clip_low=args.tis_clip_low, clip_high=args.tis_clip,
                                           rs_level=args.rs_level if args.use_rs else None,
                                           rs_low=args.rs_lower_bound, rs_high=args.rs_upper_bound,
                                           veto_threshold=args.rs_veto_threshold, normalize=args.tis_batch_normalize)
    if args.use_tis and tis_fn is not None:
        pg, num_mask, tis_metrics = call_tis_function(tis_fn, args, pg, old, roll, mask, mb.prompt_lengths,
                                                      mb.response_lengths)
    elif args.use_tis:
        pg, num_mask = pg * w, tis_mask
    if mb.offpolicy_keep is not None:
        num_mask = num_mask * mb.offpolicy_keep
    if args.staleness_decay != 1.0 and mb.staleness is not None:  # γ^staleness per sample (a constant)
        pg = pg * staleness_weights(mb.staleness, args.staleness_decay).to(pg.dtype).unsqueeze(-1)
    per_token.update(tis_metrics)  # logged even with TIS off: they measure the behaviour/proximal mismatch
    per_token["pg_loss"] = pg.detach()
    loss = reduce(pg, num_mask, den)
    if mb.ref_log_probs is not None and args.use_kl_loss:
        # --use-unbiased-kl: ρ·KL with ρ = πθ/πold, not detached (slime; DeepSeek-V3.2), clamped as a product
        ratio = torch.exp(log_probs - old) if args.use_unbiased_kl else None
        kl = kl_estimate(log_probs, mb.ref_log_probs, args.kl_loss_type, importance_ratio=ratio)
        loss = loss + args.kl_loss_coef * reduce(kl, num_mask, den)
        per_token["kl_loss"] = kl.detach()
    if entropy is not None:
        if args.entropy_coef:
            loss = loss - args.entropy_coef * reduce(entropy, num_mask, den)
        per_token["entropy"] = entropy.detach()
    out = reduce.metrics(per_token, mask, den)
    rejected = (mask - num_mask).to(pg.dtype)
    out["tis_rejected_frac"] = reduce(rejected, mask, den)
    out["loss"] = loss.detach()
    if mb.staleness is not None:  # how far π_prox is from µ, per staleness bucket (sums; fsdp.py divides)
        prox = mb.trainer_log_probs if mb.trainer_log_probs is not None else log_probs.detach()
        out.update(mismatch_by_staleness(
            {"ratio": torch.exp((prox - roll).clamp(-20, 20)), "abs_diff": (prox - roll).abs(),
             "kl": kl_behaviour_prox(prox, roll), "clipfrac": clipfrac, "rejected": rejected,
             "tis_clipfrac": tis_metrics.get("tis_clipfrac", torch.zeros_like(rejected))},
            mask, mb.staleness, max(args.max_staleness, 0)))
    return loss, out


def critic_loss(args: argparse.Namespace, mb: MicroBatch, values: Tensor, reduce: LossReducer
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss R(max((V − R)², (V_clip − R)²)) against the GAE returns; `values` with grad."""
    loss_t, clipfrac = value_loss(values, mb.values, mb.returns, args.value_clip)
    den = denominators(mb)
    loss = reduce(loss_t, mb.mask, den)
    metrics = reduce.metrics({"value_clipfrac": clipfrac, "values": values.detach(), "returns": mb.returns},
                             mb.mask, den)
    return loss, {**metrics, "value_loss": loss.detach()}
