"""slime's --reset-optimizer-states: the policy's optimizer starts every train step from fresh state (FSDP2 and
Megatron ranks)."""

from __future__ import annotations

import pytest
from trainutil import rl_batch

from streamrl.config import default_args
from streamrl.train.fsdp import FSDPTrainRank


@pytest.mark.parametrize("backend", ["fsdp", "megatron"])
def test_reset_optimizer_states_starts_every_step_fresh(tiny_ckpt, backend):
    """slime's --reset-optimizer-states: after any number of train steps Adam has taken exactly one."""
    if backend == "megatron":
        pytest.importorskip("megatron.core", reason="megatron-core is not installed")
        from streamrl.train.megatron.rank import MegatronTrainRank as cls
    else:
        cls = FSDPTrainRank
    steps = {}
    for reset in (False, True):
        args = default_args(hf_checkpoint=tiny_ckpt, rollout_batch_size=2, n_samples_per_prompt=4,
                            micro_batch_size=4, lr=1e-2, seed=1, train_backend=backend, reset_optimizer_states=reset)
        rank = cls(args, 0, 1)
        rank.init(*rank.master_address())
        try:
            for s in range(3):
                rank.train_step(rl_batch(s))
            steps[reset] = {float(st["step"]) for st in rank.opt.state.values()}
        finally:
            rank.shutdown()
    assert steps == {False: {3.0}, True: {1.0}}
