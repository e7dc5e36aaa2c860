"""A small RL batch for trainer tests: prompts of 3-5 and responses of 4-7 random tokens, behaviour log-probs in
(-2, -1], rewards alternating 0/1 with advantages ±0.5 (seeded: the same batch for every backend compared)."""

import torch

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
