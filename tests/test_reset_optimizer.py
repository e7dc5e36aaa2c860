"""slime's --reset-optimizer-states: the policy's optimizer starts every train step from fresh state (FSDP2 and
Megatron ranks)."""

from __future__ import annotations

import pytest
from trainutil import make_rank, rl_batch


@pytest.mark.parametrize("backend", ["fsdp", "megatron"])
def test_reset_optimizer_states_starts_every_step_fresh(tiny_ckpt, backend):
    """slime's --reset-optimizer-states: after any number of train steps Adam has taken exactly one."""
    steps = {}
    for reset in (False, True):
        rank = make_rank(tiny_ckpt, backend, reset_optimizer_states=reset)
        try:
            for s in range(3):
                rank.train_step(rl_batch(s))
            steps[reset] = {float(st["step"]) for st in rank.opt.state.values()}
        finally:
            rank.shutdown()
    assert steps == {False: {3.0}, True: {1.0}}
