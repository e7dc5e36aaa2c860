"""Plug-ins loaded by tests/algos/test_trainer.py through the --custom-*-path flags (slime's conventions)."""

import torch


def halve_tis(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks, total_lengths, response_lengths,
              **kw):
    """Weight every token by 0.5 and reject each sample's first token (mask 0); one metric per token."""
    masks = [m.clone() for m in loss_masks]
    for m in masks:
        m[0] = 0
    return pg_loss * 0.5, masks, {"halve_tis_seen": torch.ones_like(pg_loss)}


def reinforce_loss(args, batch, reduce):
    """Plain REINFORCE: −A·ℓθ, reduced with the configured reduction."""
    loss = reduce(-batch["advantages"] * batch["log_probs"], batch["loss_masks"])
    ones = torch.ones_like(batch["log_probs"])
    # per-token metrics are reduced by the trainer; scalars must already be in the reduction's units
    return loss, {"custom_adv_mean": batch["advantages"], "custom_scalar": reduce(ones, batch["loss_masks"])}


def constant_advantages(args, rollout_data):
    """Every response token gets advantage 2 and return 3 (slime: fill 'advantages' and 'returns')."""
    assert rollout_data["log_probs"] is not None and len(rollout_data["log_probs"]) == len(rollout_data["tokens"])
    rollout_data["advantages"] = [torch.full((r,), 2.0) for r in rollout_data["response_lengths"]]
    rollout_data["returns"] = [torch.full((r,), 3.0) for r in rollout_data["response_lengths"]]
