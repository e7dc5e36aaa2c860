"""--qkv-format thd: a packed micro-batch (one stream, no padding) gives the padded path's per-token log-probs,
entropies, values, loss and gradients (fp32, tight tolerance) on tiny Qwen3 and Llama models, through the trainer's
own step (StepRunner: policy, reference, critic), with sdpa and varlen attention (flex_attention has no backward on
CPU: tests/test_gpu_packed.py runs it)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamrl.algos.logprobs import use_chunked_log_probs
from streamrl.config import ConfigError, default_args
from streamrl.models.tiny import tiny_config
from streamrl.train.critic import ValueModel
from streamrl.train.kernels import attention_options
from streamrl.train.packed import pack_stream, unpack
from streamrl.train.step import StepRunner, micro_batches, token_budget_groups
from tests.algos.test_invariance import make_batch

VOCAB = 13  # make_batch's token ids are 1..12


def test_pack_stream_layout_by_hand():
    # sample 0: prompt [5, 6], response [7]; sample 1: prompt [8], response [9, 10]
    s = pack_stream([[5, 6, 7], [8, 9, 10]], [2, 1], [1, 2])
    assert s.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert s.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert s.cu_seqlens.tolist() == [0, 3, 6] and s.max_len == 3
    assert s.positions.tolist() == [[1, 3, 4]]  # the hidden states that predict 7, 9, 10
    assert s.targets.tolist() == [[7, 9, 10]]
    assert unpack(torch.tensor([1.0, 2.0, 3.0]), s.mask).tolist() == [[1.0, 0.0], [2.0, 3.0]]


def test_packed_token_budget_counts_real_tokens():
    lengths = [9, 2, 7, 3, 5, 1, 4]
    groups = token_budget_groups(lengths, 10, packed=True)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 4  # first-fit decreasing: 9+1, 7+3, 5+4, 2 (31 tokens need at least 4 of 10)
    assert token_budget_groups([30, 1], 8, packed=True) == [[0], [1]]  # too long for the budget: alone


def _models(arch: str, attn: str, chunk: int | None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Policy, frozen reference and critic with the same random init whatever the attention (seeded)."""
    torch.manual_seed(0)
    cfg = tiny_config(arch, vocab_size=VOCAB)
    policy = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn).eval()
    critic = ValueModel(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn))
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)  # a zero head would hide the backbone's gradients
    if chunk:
        use_chunked_log_probs(policy, chunk)
        use_chunked_log_probs(ref, chunk)
    return tuple(m.to(device, dtype) for m in (policy, ref.requires_grad_(False), critic))


def _step(args, policy, ref, critic):
    """One rank's actor and critic passes (fsdp.py's order); returns the grads, metric sums and per-token values."""
    runner = StepRunner(args, policy, ref_model=ref, critic=critic)
    mbs = micro_batches(make_batch(8), 3, next(policy.parameters()).device, max_tokens=args.max_tokens_per_gpu,
                        packed=args.qkv_format == "thd")
    runner.prepare(mbs)
    runner.compute_advantages(mbs)
    reduce = runner.reducer(mbs, 8)
    sums = runner.critic_backward(mbs, reduce)
    sums.update(runner.actor_backward(mbs, reduce))
    per_token = {}  # by sample (micro-batches may group samples differently), its r real tokens
    for mb in mbs:
        out = runner.log_probs(policy, mb, with_entropy=True)
        for i, (toks, r) in enumerate(zip(mb.tokens, mb.response_lengths, strict=True)):
            per_token[tuple(toks)] = [x[i, :r].detach() for x in (out.log_probs, out.entropy, mb.values,
                                                                  mb.ref_log_probs)]
    grads = [p.grad.clone() for m in (policy, critic) for p in m.parameters()]
    return grads, sums, per_token


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("attn, chunk, budget", [("sdpa", None, None), ("sdpa", 5, 40), ("varlen", 5, 40)])
def test_packed_step_equals_padded_step(arch, attn, chunk, budget):
    attention_options(default_args(qkv_format="thd", attn_implementation="varlen"))  # registers "varlen"
    flags = dict(advantage_estimator="ppo", use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01,
                 calculate_per_token_loss=True, use_dynamic_batch_size=budget is not None,
                 max_tokens_per_gpu=budget)
    padded_models = _models(arch, "sdpa", None)  # today's path: padded, full logits
    packed_models = _models(arch, attn, chunk)
    padded = _step(default_args(**flags), *padded_models)
    packed = _step(default_args(qkv_format="thd", attn_implementation=attn, **flags), *packed_models)
    assert padded[2].keys() == packed[2].keys()
    for key, want in padded[2].items():  # log-probs, entropies, values, reference log-probs, per token
        for a, b in zip(want, packed[2][key], strict=True):
            torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)
    for k in padded[1]:  # loss, pg_loss, kl_loss, entropy, value_loss, ...: sums over the step
        torch.testing.assert_close(packed[1][k], padded[1][k], atol=1e-6, rtol=1e-5, msg=k)
    for a, b in zip(padded[0], packed[0], strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_packed_forward_does_not_see_other_samples():
    """Changing one sample's tokens leaves every other sample's log-probs in the same stream unchanged."""
    policy, _, _ = _models("qwen3", "sdpa", None)
    batch = make_batch(4)
    args = default_args(qkv_format="thd")
    runner = StepRunner(args, policy)
    mb = micro_batches(batch, 4)[0]
    before = runner.log_probs(policy, mb).log_probs
    mb2 = copy.deepcopy(mb)
    mb2.tokens[0] = [(t % 12) + 1 for t in mb2.tokens[0]]
    after = runner.log_probs(policy, mb2).log_probs
    torch.testing.assert_close(after[1:], before[1:], atol=1e-6, rtol=0)
    assert not torch.equal(after[0], before[0])


def test_varlen_needs_packed_micro_batches():
    with pytest.raises(ConfigError, match="--qkv-format thd"):
        default_args(attn_implementation="varlen")
