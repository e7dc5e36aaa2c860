"""slime's --ref-update-interval: every N train steps the reference model takes the policy's weights (and not in
between); a checkpoint keeps the refreshed reference, so a resume continues exactly (FSDP2 and Megatron ranks)."""

from __future__ import annotations

import pytest
import torch
from trainutil import make_rank, rl_batch

from streamrl.config import ConfigError, default_args


def _rank(ckpt: str, backend: str):
    return make_rank(ckpt, backend, use_kl_loss=True, kl_loss_coef=0.1, ref_update_interval=2)


def _same(rank) -> bool:
    ref = dict(rank.ref_model.named_parameters())
    return all(torch.equal(ref[k], v) for k, v in rank.full_named_parameters())


@pytest.mark.parametrize("backend", ["fsdp", "megatron"])
def test_the_reference_follows_the_policy_every_n_steps(tiny_ckpt, tmp_path, backend):
    rank = _rank(tiny_ckpt, backend)
    try:
        rank.train_step(rl_batch(0))
        assert not _same(rank)  # step 1: the reference is still --hf-checkpoint's
        rank.train_step(rl_batch(1))
        assert _same(rank)  # step 2: refreshed
        rank.train_step(rl_batch(2))
        assert not _same(rank)
        rank.save_state(str(tmp_path / "ck"))
        want = rank.train_step(rl_batch(3))
    finally:
        rank.shutdown()
    again = _rank(tiny_ckpt, backend)
    try:
        again.load_state(str(tmp_path / "ck"))
        got = again.train_step(rl_batch(3))  # KL against the reference of step 2, not --hf-checkpoint's
    finally:
        again.shutdown()
    assert got["kl_loss"] == want["kl_loss"] and got["loss"] == want["loss"]


def test_needs_a_reference():
    with pytest.raises(ConfigError, match="--ref-update-interval"):
        default_args(ref_update_interval=2)
