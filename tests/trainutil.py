"""Trainer-test helpers: a small RL batch (prompts of 3-5 and responses of 4-7 random tokens, behaviour log-probs
in (-2, -1], rewards alternating 0/1 with advantages ±0.5; seeded: the same batch for every backend compared) and
one initialised trainer rank of either backend (world of 1, gloo)."""

import pytest
import torch

from streamrl.config import default_args
from streamrl.train.batch import TrainBatch


def rl_batch(seed: int, n: int = 8) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    plen = [3 + i % 3 for i in range(n)]
    rlen = [4 + i % 4 for i in range(n)]
    toks = [torch.randint(0, 80, (p + r,), generator=g).tolist() for p, r in zip(plen, rlen, strict=True)]
    rewards = [float(i % 2) for i in range(n)]
    return TrainBatch(tokens=toks, prompt_lengths=plen, response_lengths=rlen, loss_masks=[[1] * r for r in rlen],
                      rollout_log_probs=[(-1 - torch.rand(r, generator=g)).tolist() for r in rlen],
                      advantages=[x - 0.5 for x in rewards], rewards=rewards, staleness=[0] * n)


def make_rank(ckpt: str, backend: str = "fsdp", **over):
    """An initialised rank of `backend` on the tiny checkpoint (lr 1e-2, seed 1, 8 samples of 4 per prompt);
    `over` adds flags. The caller shuts it down. Megatron is skipped where megatron-core is not installed."""
    args = default_args(hf_checkpoint=ckpt, rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
                        lr=1e-2, seed=1, train_backend=backend, **over)
    if backend == "megatron":
        pytest.importorskip("megatron.core", reason="megatron-core is not installed")
        from streamrl.train.megatron.rank import MegatronTrainRank as cls
    else:
        from streamrl.train.fsdp import FSDPTrainRank as cls
    rank = cls(args, 0, 1)
    rank.init(*rank.master_address())
    return rank


def assert_adam_weights_close(got: list[torch.Tensor], want: list[torch.Tensor], mean: float = 1e-5) -> None:
    """Weights after a few Adam steps at lr 1e-2 from the same start, computed two ways that differ only in fp32
    summation order: Adam's g/sqrt(v) magnifies the rounding of near-zero gradients into differences of up to
    ~1e-3 on a few weights (how much depends on the CPU's kernels and threads), while a real difference in the
    gradients moves most weights by about a step (1e-2). So: the largest difference under half a step, the mean
    difference far under it."""
    diffs = torch.cat([(g - w).abs().flatten() for g, w in zip(got, want, strict=True)])
    big, avg = diffs.max().item(), diffs.mean().item()
    assert big < 5e-3 and avg < mean, f"weights differ: max {big:.3g}, mean {avg:.3g}"
