"""A trainer rank's sleep/wake_up (--colocate): parameters and optimizer state leave and come back unchanged, and
one step after an offload + onload is the step without it, exactly (FSDP2 and Megatron ranks, gloo, world of 1,
tiny model)."""

from __future__ import annotations

import pytest
import torch
from trainutil import make_rank, rl_batch

batch = rl_batch


def make(ckpt: str, backend: str):
    return make_rank(ckpt, backend, use_kl_loss=True, kl_loss_coef=0.1)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _snapshot(rank) -> tuple[dict, dict]:
    weights = {n: _local(p).detach().clone() for n, p in rank.model.named_parameters()}
    state = {(i, k): _local(v).clone() for i, s in enumerate(rank.opt.state.values()) for k, v in s.items()}
    return weights, state


@pytest.mark.parametrize("backend", ["fsdp", "megatron"])
def test_offload_round_trip_then_the_same_step(tiny_ckpt, backend):
    rank = make(tiny_ckpt, backend)
    try:
        rank.train_step(batch(0))  # AdamW's moments exist now
        weights, state = _snapshot(rank)
        params = list(rank.model.parameters())
        ptrs = [_local(p).data_ptr() for p in params]
        assert rank.sleep()["trainer_offload_time"] >= 0 and rank.asleep
        assert rank.sleep() == {}  # already asleep: nothing to do
        assert list(rank.model.parameters()) == params  # the optimizer's Parameter objects stay
        assert all(_local(p).data_ptr() != q for p, q in zip(params, ptrs, strict=True))  # the storages moved
        rank.wake_up()
        assert not rank.asleep
        w2, s2 = _snapshot(rank)
        assert all(torch.equal(weights[n], w2[n]) for n in weights)
        assert s2.keys() == state.keys() and all(torch.equal(state[k], s2[k]) for k in state)
        got = rank.train_step(batch(1))
        got_w = {n: _local(p).detach().clone() for n, p in rank.model.named_parameters()}
    finally:
        rank.shutdown()
    plain = make(tiny_ckpt, backend)
    try:
        plain.train_step(batch(0))
        want = plain.train_step(batch(1))
        want_w = {n: _local(p).detach().clone() for n, p in plain.model.named_parameters()}
    finally:
        plain.shutdown()
    for k in ("loss", "pg_loss", "kl_loss", "grad_norm", "entropy"):
        assert got[k] == want[k], k
    assert all(torch.equal(got_w[n], want_w[n]) for n in want_w)
