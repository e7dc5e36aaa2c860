"""`--train-backend megatron` in-process (gloo, world of 1) on the tiny model: the same RL steps as the FSDP rank
on the same batches (loss, grad norm, weights), HF names for the engines, exact resume from Megatron's checkpoint
layout, slime's three hooks, the HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from trainutil import assert_adam_weights_close, rl_batch

from streamrl.config import default_args  # noqa: E402
from streamrl.train.fsdp import FSDPTrainRank  # noqa: E402
from streamrl.train.megatron.checkpoint import read_hf_weights  # noqa: E402
from streamrl.train.megatron.rank import MegatronTrainRank  # noqa: E402

HOOKS = Path(__file__).parent / "plugins" / "megatron_hooks.py"


batch = rl_batch


def make(cls, ckpt: str, **over):
    args = default_args(**{"hf_checkpoint": ckpt, "rollout_batch_size": 2, "n_samples_per_prompt": 4,
                           "micro_batch_size": 4, "lr": 1e-2, "seed": 1, **over})
    rank = cls(args, 0, 1)
    rank.init(*rank.master_address())
    return rank


def run(rank, seeds) -> list[dict[str, float]]:
    try:
        return [rank.train_step(batch(s)) for s in seeds]
    finally:
        rank.shutdown()


@pytest.mark.parametrize("over", [
    {"use_kl_loss": True, "kl_loss_coef": 0.1},  # GRPO, PPO clip against µ, KL to the reference
    {"advantage_estimator": "ppo", "kl_coef": 0.05},  # PPO: the critic (GAE, clipped value loss), KL-shaped rewards
    # packed streams (Megatron's thd PackedSeqParams vs the HF model's restarting position ids), with the critic
    {"qkv_format": "thd", "use_dynamic_batch_size": True, "max_tokens_per_gpu": 64, "advantage_estimator": "ppo"},
    # the LM head on the response positions only, 3 tokens at a time (padded micro-batches), and the entropy bonus
    {"log_probs_chunk_size": 3, "entropy_coef": 0.01, "use_kl_loss": True, "kl_loss_coef": 0.1},
], ids=["grpo_kl", "ppo_critic", "packed_thd", "chunked_head"])
def test_same_steps_as_fsdp(tiny_ckpt, over):
    """Three RL steps: the two backends agree step by step."""
    over = {"train_backend": "megatron", **over}
    fsdp = make(FSDPTrainRank, tiny_ckpt, **{**over, "train_backend": "fsdp"})
    try:
        want = [fsdp.train_step(batch(s)) for s in range(3)]
        want_w = dict(fsdp.full_named_parameters())
    finally:
        fsdp.shutdown()
    mg = make(MegatronTrainRank, tiny_ckpt, **over)
    try:
        got = [mg.train_step(batch(s)) for s in range(3)]
        got_w = dict(mg.full_named_parameters())
    finally:
        mg.shutdown()
    for w, g in zip(want, got, strict=True):
        keys = ["loss", "pg_loss", "entropy", "grad_norm", "train_rollout_logprob_abs_diff"]
        keys += ["value_loss", "value_clipfrac", "critic_grad_norm"] if "advantage_estimator" in over else ["kl_loss"]
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
    assert got_w.keys() == want_w.keys()  # HF names, tied lm_head absent as in the HF model's parameters
    assert_adam_weights_close([got_w[k] for k in want_w], list(want_w.values()))  # mean 3e-6 with the chunked head


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_resume_is_exact_and_hooks_run(tiny_ckpt, tmp_path, monkeypatch, fmt):
    log = tmp_path / "hooks.jsonl"
    monkeypatch.setenv("STREAMRL_TEST_HOOK_LOG", str(log))
    hooks = {f"custom_megatron_{k}_path": f"{HOOKS}:{k}" for k in ("init", "before_train_step_hook",
                                                                    "before_log_prob_hook")}
    rank = make(MegatronTrainRank, tiny_ckpt, train_backend="megatron", ckpt_format=fmt, **hooks)
    try:
        rank.train_step(batch(0))
        rank.save_state(str(tmp_path / "ck"))
        want = rank.train_step(batch(1))
        want_after = dict(rank.full_named_parameters())  # after an optimizer step: needs the moments restored
        rank.save_hf(str(tmp_path / "hf"))
    finally:
        rank.shutdown()
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "1"
    it = tmp_path / "ck" / "iter_0000001"
    if fmt == "torch":
        assert (it / "mp_rank_00" / "model_optim_rng.pt").exists()
    else:  # Megatron's dist_checkpointing directory, with slime's/TransformerEngine's key names, layers stacked
        assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(it)).read_metadata().state_dict_metadata
        assert meta["decoder.layers.self_attention.linear_qkv.layer_norm_weight"].size[0] == 3  # 3 layers
        assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight" in meta
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["hook"] for c in calls[:3]] == ["init", "before_log_prob_hook", "before_train_step_hook"]
    assert calls[2]["rollout_id"] == 0 and calls[-1]["rollout_id"] == 1 and calls[1]["store_prefix"] == ""

    again = make(MegatronTrainRank, tiny_ckpt, train_backend="megatron")
    try:
        again.load_state(str(tmp_path / "ck"))
        again_named = again.full_named_parameters()
        got = again.train_step(batch(1))
        got_after = dict(again.full_named_parameters())
    finally:
        again.shutdown()
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    assert all(torch.equal(got_after[k], v) for k, v in want_after.items())
    saved = read_hf_weights(tmp_path / "ck")  # what --check-weight-update-equal compares at a resume
    assert set(saved) == {k for k, _ in again_named} and all(torch.equal(saved[k], v) for k, v in again_named)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.config.vocab_size == 88 and (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_ref_load_reads_a_torch_dist_checkpoint(tiny_ckpt, tmp_path):
    """slime's --ref-load is a Megatron torch_dist directory: the frozen reference gets exactly its weights, of the
    latest iteration or of --ref-ckpt-step's."""
    rank = make(MegatronTrainRank, tiny_ckpt, train_backend="megatron")
    trained = []
    try:
        for step in range(2):  # lr 1e-2: the saved weights differ from --hf-checkpoint's and between iterations
            rank.train_step(batch(step))
            rank.save_state(str(tmp_path / "ck"))
            trained.append(dict(rank.full_named_parameters()))
    finally:
        rank.shutdown()
    for step, want in ((None, trained[1]), (1, trained[0])):
        ref = make(MegatronTrainRank, tiny_ckpt, train_backend="megatron", use_kl_loss=True, kl_loss_coef=0.1,
                   ref_load=str(tmp_path / "ck"), ref_ckpt_step=step)
        try:
            got = dict(ref.ref_model.named_parameters())
        finally:
            ref.shutdown()
        assert want.keys() <= got.keys() and all(torch.equal(got[k], v) for k, v in want.items()), step
    hf = AutoModelForCausalLM.from_pretrained(tiny_ckpt).state_dict()
    assert any(not torch.equal(v, hf[k]) for k, v in trained[0].items())
    bad = MegatronTrainRank(default_args(hf_checkpoint=tiny_ckpt, train_backend="megatron", use_kl_loss=True,
                                         kl_loss_coef=0.1, ref_load=str(tmp_path / "ck"), ref_ckpt_step=7), 0, 1)
    try:
        with pytest.raises(FileNotFoundError, match="no iteration 7"):
            bad.init(*bad.master_address())
    finally:
        bad.shutdown()


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_ppo_resume_restores_the_critic(tiny_ckpt, tmp_path, fmt):
    over = {"train_backend": "megatron", "advantage_estimator": "ppo", "ckpt_format": fmt}
    rank = make(MegatronTrainRank, tiny_ckpt, **over)
    try:
        rank.train_step(batch(0))
        rank.save_state(str(tmp_path / "ck"))
        want = rank.train_step(batch(1))
    finally:
        rank.shutdown()
    again = make(MegatronTrainRank, tiny_ckpt, **over)
    try:
        again.load_state(str(tmp_path / "ck"))
        got = again.train_step(batch(1))
    finally:
        again.shutdown()
    for k in ("loss", "value_loss", "critic_grad_norm", "grad_norm"):
        assert got[k] == want[k], k
    grpo = make(MegatronTrainRank, tiny_ckpt, train_backend="megatron", ckpt_format=fmt)
    try:
        grpo.save_state(str(tmp_path / "grpo"))
    finally:
        grpo.shutdown()
    plain = make(MegatronTrainRank, tiny_ckpt, **over)
    try:
        with pytest.raises(ValueError, match="without the PPO critic"):
            plain.load_state(str(tmp_path / "grpo"))
    finally:
        plain.shutdown()


@pytest.mark.gpu  # torch.compile of the decoder layers: ~50 s of compilation on 2 CPU cores, seconds on a GPU
def test_compiled_layers_give_the_eager_steps(tiny_ckpt):
    over = {"train_backend": "megatron", "qkv_format": "thd", "use_dynamic_batch_size": True, "max_tokens_per_gpu": 64}
    want = run(make(MegatronTrainRank, tiny_ckpt, **over), range(2))
    got = run(make(MegatronTrainRank, tiny_ckpt, use_torch_compile=True, **over), range(2))
    # the rank turns on TF32 matmuls on a GPU: compiled and eager kernels round their fp32 sums differently (on
    # CPU, in true fp32, they agreed within 1e-7)
    rel = (2e-3, 2e-2) if torch.cuda.is_available() else (1e-5, 1e-4)
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=rel[0]), (g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=rel[1]), (g["grad_norm"], w["grad_norm"])
