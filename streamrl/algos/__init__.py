"""Pure RL math on tensors: advantages, per-token losses, reductions and token log-probs (torch only).

Nothing here knows about Ray, processes or distributed training; see `losses.py` for how the trainer reduces the
per-token loss so that micro-batching and data-parallel splitting give the same gradient.
"""

from streamrl.algos.advantages import expand_to_tokens, grpo_advantages
from streamrl.algos.logprobs import ResponseLogProbs, entropy_from_logits, response_log_probs, token_log_probs
from streamrl.algos.losses import (
    kl_estimate,
    masked_mean,
    masked_sample_mean_sum,
    masked_token_sum,
    policy_loss,
    ppo_clip_loss,
    reduce_metrics,
    sft_loss,
    tis_weights,
)

__all__ = [
    "ResponseLogProbs",
    "entropy_from_logits",
    "expand_to_tokens",
    "grpo_advantages",
    "kl_estimate",
    "masked_mean",
    "masked_sample_mean_sum",
    "masked_token_sum",
    "policy_loss",
    "ppo_clip_loss",
    "reduce_metrics",
    "response_log_probs",
    "sft_loss",
    "tis_weights",
    "token_log_probs",
]
