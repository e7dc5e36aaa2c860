"""The trainer's step (streamrl/train/step.py) gives the same gradients whatever the micro-batch size and the number
of data-parallel ranks, for every estimator / loss / reduction / off-policy mode; masks are respected.

Ranks are simulated in-process: one thread per rank, each with its own copy of the models, and an all_reduce
built on a barrier. FSDP averages gradients over ranks, so the reference is mean_r(grad_r) == full-batch grad.
"""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch
from torch import nn

from streamrl.config import default_args
from streamrl.train.batch import TrainBatch
from streamrl.train.step import StepRunner, micro_batches


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 8, out: int | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, out or vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.mix(torch.cumsum(h, dim=1)))  # causal mixing so context matters
        return self.head(h)


class TinyCritic(TinyLM):
    def __init__(self):
        super().__init__(out=1)

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids).squeeze(-1)


class ThreadAllReduce:
    """Sum over `world` threads; every thread gets the same result."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        i = self.barrier.wait()
        self.slots[i] = t.detach().clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        return total


def make_batch(n: int = 8, seed: int = 0) -> TrainBatch:
    """Varied lengths, a tool token span in sample 1, a removed sample (all-zero mask) at index 5."""
    g = random.Random(seed)
    tokens, plen, rlen, masks, lps = [], [], [], [], []
    for i in range(n):
        p, r = g.randint(1, 4), g.randint(1, 6)
        tokens.append([g.randint(1, 12) for _ in range(p + r)])
        plen.append(p)
        rlen.append(r)
        m = [1] * r
        if i == 1 and r >= 3:
            m[1:3] = [0, 0]
        if i == 5:
            m = [0] * r
        masks.append(m)
        lps.append([-2.6 + 0.6 * g.random() for _ in range(r)])
    rewards = [float(g.random() > 0.5) for _ in range(n)]
    return TrainBatch(tokens=tokens, prompt_lengths=plen, response_lengths=rlen, loss_masks=masks,
                      rollout_log_probs=lps, advantages=[r - 0.4 for r in rewards], rewards=rewards,
                      staleness=[i % 3 for i in range(n)])


CONFIGS = {
    "grpo_tis": dict(use_tis=True),
    "grpo_default_m2": dict(m2_threshold=0.05, staleness_decay=0.5),
    "gspo_token_mean_icepop": dict(advantage_estimator="gspo", calculate_per_token_loss=True, tis_mode="mask",
                                   tis_clip_low=0.8, tis_clip=1.5, entropy_coef=0.01),
    "cispo_drgrpo_geometric": dict(advantage_estimator="cispo", loss_normalizer_constant=8.0, tis_level="geometric",
                                   eps_clip_high=0.28),
    "rfpp_whiten_klshaping_seqmask": dict(advantage_estimator="reinforce_plus_plus", normalize_advantages=True,
                                          kl_coef=0.05, gamma=0.9, tis_level="sequence", tis_mode="mask",
                                          tis_clip=1.2, tis_clip_low=0.5),
    "ppo_critic": dict(advantage_estimator="ppo", gamma=0.95, lambd=0.9, eps_clip_c=3.0, normalize_advantages=True),
    "opd_klloss_dualclip": dict(use_opd=True, opd_teacher_load="t", opd_kl_coef=0.3, use_kl_loss=True,
                                kl_loss_coef=0.1, kl_loss_type="k3", eps_clip_c=3.0, entropy_coef=0.01),
    "balance_data_token_mean": dict(balance_data=True, calculate_per_token_loss=True, entropy_coef=0.01),
    "unbiased_kl_k3": dict(use_kl_loss=True, kl_loss_coef=0.2, kl_loss_type="k3", use_unbiased_kl=True),
    "grpo_rs_veto_opsm": dict(use_rs=True, rs_lower_bound=0.8, rs_upper_bound=1.25, rs_veto_threshold=0.7,
                              use_opsm=True, opsm_delta=-0.01, entropy_coef=0.01),
    "rollout_logprobs_rfppb": dict(advantage_estimator="reinforce_plus_plus_baseline", normalize_advantages=True,
                                   use_rollout_logprobs=True, calculate_per_token_loss=True),
}


def _models(seed: int = 0):
    torch.manual_seed(seed)
    return {"model": TinyLM(), "ref_model": TinyLM(), "teacher": TinyLM(), "critic": TinyCritic()}


def run_rank(args, models, batch: TrainBatch, rank: int, world: int, mbs: int, all_reduce=None, max_tokens=None):
    """One rank's part of a step; returns (actor grads, critic grads, metric sums)."""
    kw = {k: v for k, v in models.items() if k != "model"}
    if not (args.use_kl_loss or args.kl_coef > 0):
        kw["ref_model"] = None
    if not args.use_opd:
        kw["teacher"] = None
    if args.advantage_estimator != "ppo":
        kw["critic"] = None
    runner = StepRunner(args, models["model"], world=world, **({"all_reduce": all_reduce} if all_reduce else {}),
                        **kw)
    shard = micro_batches(batch.shard(rank, world, balance=args.balance_data), mbs, max_tokens=max_tokens)
    runner.prepare(shard)
    runner.compute_advantages(shard)
    runner.apply_m2(shard)
    reduce = runner.reducer(shard, batch.num_rollouts())
    sums = runner.actor_backward(shard, reduce)
    if runner.critic is not None:
        sums.update(runner.critic_backward(shard, reduce))
    grads = [p.grad.clone() for p in models["model"].parameters()]
    cgrads = [p.grad.clone() for p in models["critic"].parameters()] if runner.critic is not None else []
    return grads, cgrads, sums


def run_world(args, models, batch, world: int, mbs: int, max_tokens: int | None = None):
    if world == 1:
        return [run_rank(args, copy.deepcopy(models), batch, 0, 1, mbs, max_tokens=max_tokens)]
    ar, out, errors = ThreadAllReduce(world), [None] * world, []

    def body(r):
        try:
            out[r] = run_rank(args, copy.deepcopy(models), batch, r, world, mbs, ar, max_tokens)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            ar.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _mean(grads_per_rank):
    return [torch.stack(gs).mean(0) for gs in zip(*grads_per_rank, strict=True)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_invariant_to_micro_batches_and_ranks(name):
    args = default_args(rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=1, **CONFIGS[name])
    models, batch = _models(), make_batch()
    (full_g, full_c, full_m), = run_world(args, models, batch, 1, 8)
    assert any(g.abs().sum() > 0 for g in full_g)
    # (ranks, micro-batch size, --max-tokens-per-gpu): fixed sizes, and token-budget micro-batches (dynamic batch
    # size: reordered longest first, 1-3 samples each here; 5 is below the longest sample, which then goes alone)
    for world, mbs, max_tokens in ((1, 1, None), (1, 3, None), (2, 1, None), (2, 4, None), (4, 2, None),
                                   (1, 8, 16), (2, 8, 12), (1, 8, 5)):
        res = run_world(args, models, batch, world, mbs, max_tokens)
        for a, b in zip(_mean([r[0] for r in res]), full_g, strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=f"{name}: world {world}, mbs {mbs}")
        if full_c:
            for a, b in zip(_mean([r[1] for r in res]), full_c, strict=True):
                torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
        for k, v in full_m.items():  # metrics summed over micro-batches and ranks are the full-batch values
            torch.testing.assert_close(sum(r[2][k] for r in res), v, atol=1e-6, rtol=1e-5, msg=k)


def test_per_rollout_denominators_invariant_and_not_per_sample():
    """Samples grouped into rollouts (Sample.rollout_id): the same gradient over micro-batches and ranks (the
    rollout totals are computed for the whole step before sharding), different from the per-sample mean; one id
    per sample gives the per-sample mean exactly."""
    args = default_args(rollout_batch_size=2, n_samples_per_prompt=4, entropy_coef=0.01, use_tis=True)
    models, batch = _models(), make_batch()
    batch.rollout_ids = [0, 0, 1, 1, 1, 2, 3, 3]
    (step,) = batch.mini_batches(1)
    (full, _, full_m), = run_world(args, models, step, 1, 8)
    for world, mbs in ((1, 1), (2, 1), (4, 2), (2, 3)):
        res = run_world(args, models, step, world, mbs)
        for a, b in zip(_mean([r[0] for r in res]), full, strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=f"world {world}, mbs {mbs}")
        for k, v in full_m.items():
            torch.testing.assert_close(sum(r[2][k] for r in res), v, atol=1e-6, rtol=1e-5, msg=k)
    (plain, _, _), = run_world(args, models, make_batch(), 1, 8)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(full, plain, strict=True))
    own = make_batch()
    own.rollout_ids = list(range(8))
    (own_g, _, _), = run_world(args, models, own.mini_batches(1)[0], 1, 8)
    for a, b in zip(own_g, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_naive_per_micro_batch_token_mean_would_differ():
    """Sanity check of the test: normalising by the micro-batch's own token count breaks the invariance."""
    args = default_args(rollout_batch_size=2, n_samples_per_prompt=4, calculate_per_token_loss=True)
    models, batch = _models(), make_batch()
    (full, _, _), = run_world(args, models, batch, 1, 8)
    m = copy.deepcopy(models)
    runner = StepRunner(args, m["model"])
    shard = micro_batches(batch, 2)
    runner.compute_advantages(shard)
    for mb in shard:  # the bug this design avoids: each micro-batch divides by its own token count
        runner.actor_backward([mb], runner.reducer([mb], len(batch)))
    naive = [p.grad for p in m["model"].parameters()]
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(naive, full, strict=True))


def test_masked_tokens_and_removed_samples_do_not_matter():
    """Changing anything on loss-masked positions (tool tokens, the removed sample's tokens) changes no gradient,
    while the removed sample still counts in the sample-mean denominator N."""
    args = default_args(rollout_batch_size=2, n_samples_per_prompt=4, tis_level="geometric")
    models, batch = _models(), make_batch()
    (g, _, m), = run_world(args, models, batch, 1, 2)
    other = TrainBatch(**{f: copy.deepcopy(getattr(batch, f)) for f in batch.__struct_fields__})
    other.rollout_log_probs[1][1:3] = [-9.0, 0.0]  # tool tokens
    other.rollout_log_probs[5] = [-7.0] * len(other.rollout_log_probs[5])  # removed sample
    other.advantages[5] = 100.0
    other.tokens[5] = other.tokens[5][: other.prompt_lengths[5]] + [3] * other.response_lengths[5]
    (g2, _, m2), = run_world(args, models, other, 1, 2)
    for a, b in zip(g, g2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert m["pg_loss"] == m2["pg_loss"]
    # dropping the removed sample from the batch changes N (8 -> 7) and scales the gradient by 8/7
    keep = [i for i in range(8) if i != 5]
    smaller = batch.select(keep)
    (g3, _, _), = run_world(args, models, smaller, 1, 7)
    for a, b in zip(g, g3, strict=True):
        torch.testing.assert_close(a * 8 / 7, b, atol=1e-6, rtol=1e-5)


def test_token_budget_groups():
    from streamrl.train.step import token_budget_groups

    lengths = [3, 9, 4, 9, 2, 12, 5]
    groups = token_budget_groups(lengths, 20)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every sample exactly once
    assert all(len(g) * max(lengths[i] for i in g) <= 20 or len(g) == 1 for g in groups)
    assert groups == [[5], [1, 3], [6, 2, 0, 4]]  # 12 | 9+9 (2x9=18) | 5,4,3,2 (4x5=20)
    assert token_budget_groups([30, 1], 8) == [[0], [1]]  # too long for the budget: alone
    # as many micro-batches as another rank needs (FSDP ranks must run the same number of forwards)
    split = token_budget_groups(lengths, 20, min_groups=5)
    assert len(split) == 5 and sorted(i for g in split for i in g) == list(range(len(lengths)))
    assert len(token_budget_groups(lengths, 1000, min_groups=7)) == 7
    with pytest.raises(ValueError):
        token_budget_groups(lengths, 20, min_groups=8)


def _train_mini_batches(args, model, batch, rank, world, mbs, all_reduce=None, lr=0.5):
    """--num-mini-batches as fsdp.py runs it: equal parts, each sharded over the ranks, one plain SGD step on the
    rank-averaged gradient per part; returns the final parameters."""
    ar = all_reduce or (lambda t: t)
    runner = StepRunner(args, model, world=world, **({"all_reduce": all_reduce} if all_reduce else {}))
    parts = batch.mini_batches(args.num_mini_batches)
    per_part = [micro_batches(p.shard(rank, world), mbs) for p in parts]
    flat = [mb for part in per_part for mb in part]
    runner.prepare(flat)
    runner.compute_advantages(flat)
    runner.apply_m2(flat)

    def opt_step():
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * ar(p.grad) / world  # FSDP's gradient average over ranks
                p.grad = None

    runner.actor_steps(per_part, [len(p) for p in parts], opt_step)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("over", [dict(use_tis=True), dict(m2_threshold=0.05)])
def test_mini_batch_steps_invariant_to_micro_batches_and_ranks(over):
    """Two optimizer steps per train step against one π_prox: the same parameters for any micro-batch size and
    number of ranks, and not those of one step over the whole batch."""
    args = default_args(rollout_batch_size=2, n_samples_per_prompt=4, num_mini_batches=2, eps_clip=0.05, **over)
    model, batch = _models()["model"], make_batch()
    full = _train_mini_batches(args, copy.deepcopy(model), batch, 0, 1, 8)
    one = default_args(rollout_batch_size=2, n_samples_per_prompt=4, eps_clip=0.05, **over)
    assert any(not torch.allclose(a, b) for a, b in
               zip(full, _train_mini_batches(one, copy.deepcopy(model), batch, 0, 1, 8), strict=True))
    for world, mbs in ((1, 1), (2, 1), (2, 2)):
        ar, out = ThreadAllReduce(world), [None] * world

        def body(r, world=world, mbs=mbs, ar=ar, out=out):
            out[r] = _train_mini_batches(args, copy.deepcopy(model), batch, r, world, mbs, ar if world > 1 else None)

        threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(o is not None for o in out)
        for rank_params in out:
            for a, b in zip(rank_params, full, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"world {world}, mbs {mbs}")
