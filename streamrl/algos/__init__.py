"""Pure RL math on tensors: advantages, per-token losses, off-policy weights, reductions and token log-probs.

Nothing here knows about Ray, processes or distributed training (a cross-rank sum, where one is needed, is passed
in as a function). See `reduce.py` for why the gradient does not depend on micro-batching or data-parallel
splitting, `offpolicy.py` for the behaviour-policy correction, and `streamrl/train/objective.py` for how the trainer
assembles the three-policy objective from these pieces.
"""

from streamrl.algos.advantages import (
    discounted_returns,
    expand_to_tokens,
    gae,
    grpo_advantages,
    kl_shaped_rewards,
    last_token_onehot,
    masked_whiten,
    opd_advantages,
    reinforce_pp_baseline,
)
from streamrl.algos.corrections import (
    behaviour_anchored_loss,
    bucket_means,
    decoupled_ppo_loss,
    kl_behaviour_prox,
    m2_keep_mask,
    mismatch_by_staleness,
    staleness_weights,
)
from streamrl.algos.logprobs import ResponseLogProbs, entropy_from_logits, response_log_probs, token_log_probs
from streamrl.algos.losses import (
    cispo_loss,
    gspo_log_ratio,
    kl_estimate,
    pg_loss,
    policy_loss,
    ppo_clip_loss,
    sft_loss,
    tis_weights,
    value_loss,
)
from streamrl.algos.offpolicy import (
    BUILTIN_TIS_FUNCTIONS,
    call_tis_function,
    icepop_function,
    importance_weights,
    vanilla_tis_function,
)
from streamrl.algos.reduce import (
    LossReducer,
    masked_mean,
    masked_sample_mean_sum,
    masked_token_sum,
    reduce_metrics,
    rollout_mask_sums,
    token_count,
)
from streamrl.algos.rejection import batch_normalized, mis_weights, opsm_keep, rejection_keep, veto_keep

__all__ = [
    "BUILTIN_TIS_FUNCTIONS",
    "LossReducer",
    "ResponseLogProbs",
    "batch_normalized",
    "behaviour_anchored_loss",
    "bucket_means",
    "call_tis_function",
    "cispo_loss",
    "decoupled_ppo_loss",
    "discounted_returns",
    "entropy_from_logits",
    "expand_to_tokens",
    "gae",
    "grpo_advantages",
    "gspo_log_ratio",
    "icepop_function",
    "importance_weights",
    "kl_behaviour_prox",
    "kl_estimate",
    "kl_shaped_rewards",
    "last_token_onehot",
    "m2_keep_mask",
    "masked_mean",
    "masked_sample_mean_sum",
    "masked_token_sum",
    "masked_whiten",
    "mis_weights",
    "mismatch_by_staleness",
    "opd_advantages",
    "opsm_keep",
    "pg_loss",
    "policy_loss",
    "ppo_clip_loss",
    "reduce_metrics",
    "rejection_keep",
    "rollout_mask_sums",
    "token_count",
    "reinforce_pp_baseline",
    "response_log_probs",
    "sft_loss",
    "staleness_weights",
    "tis_weights",
    "token_log_probs",
    "value_loss",
    "veto_keep",
    "vanilla_tis_function",
]
