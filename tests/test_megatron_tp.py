"""Several Megatron ranks on CPU (gloo), tensor parallel (TP=2), pipeline parallel (PP=3: first, middle and last
stage, the tied embedding split between first and last) or data parallel (DDP), take the same RL steps as one rank
on the same batches: loss, grad norm (summed over the TP shards and stages) and the weights gathered back to HF
names; the checkpoint reads back whole, and one rank resumes a torch_dist checkpoint that several saved."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from streamrl.train.megatron.checkpoint import read_hf_weights  # noqa: E402
from streamrl.train.megatron.rank import MegatronTrainRank  # noqa: E402
from streamrl.train.optim import local_optimizer  # noqa: E402
from tests.test_megatron_backend import batch, make  # noqa: E402
from tests.trainutil import assert_adam_weights_close  # noqa: E402

pytestmark = pytest.mark.slow
OVER = {"train_backend": "megatron", "use_kl_loss": True, "kl_loss_coef": 0.1}


def _tp_rank(rank: int, port: int, ckpt: str, out: str, tp: int, world: int, fmt: str, extra: dict) -> None:
    torch.set_num_threads(1)
    from streamrl.config import default_args

    # with torch_dist, TP=2 pads the vocabulary as TP=1 does (64 x 2 = 128), so that one rank can load the checkpoint
    args = default_args(hf_checkpoint=ckpt, rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
                        lr=1e-2, seed=1, tensor_model_parallel_size=tp, actor_num_gpus_per_node=world, ckpt_format=fmt,
                        make_vocab_size_divisible_by=128 // tp, **OVER, **extra)
    if args.sequence_parallel:  # Megatron's sequence-parallel layers allocate on torch.cuda.current_device()
        torch.cuda.current_device = lambda: "cpu"
    r = MegatronTrainRank(args, rank, world)
    r.init("127.0.0.1", port)
    if extra.get("log_probs_chunk_size") and r.dp_size == 2:  # DDP: the wrapped model's chunked head is the one scoring
        from streamrl.algos.logprobs import output_head

        assert output_head(r.model) is r.model.module.head is not None
    try:
        metrics = [r.train_step(batch(s)) for s in range(2)]
        named = r.full_named_parameters()
        r.save_state(out)
        # the parameters whose optimizer state this rank keeps, of its trainable ones
        local, names = local_optimizer(r.opt), {p: n for n, p in r.gpt.named_parameters()}
        held = (len(local.state), sum(p.requires_grad for p in r.gpt.parameters()),
                {names[p]: s["exp_avg"].clone() for p, s in local.state.items()})
    finally:
        r.shutdown()
    torch.save((metrics, dict(named) if named is not None else None, held), f"{out}.rank{rank}")


# TP=2 (both checkpoint formats); PP=3 over the tiny model's 3 layers (with the chunked LM head on the last stage,
# and with packed streams);
# data parallel (DDP) with TP=1 and the chunked LM head; TP=2 with sequence parallel (and with PP=3: six ranks); CP=2
@pytest.mark.parametrize("tp,world,fmt,extra", [
    (2, 2, "torch_dist", {}), (2, 2, "torch", {}),
    (1, 3, "torch_dist", {"pipeline_model_parallel_size": 3, "log_probs_chunk_size": 3}),
    (1, 3, "torch_dist", {"pipeline_model_parallel_size": 3, "qkv_format": "thd", "use_dynamic_batch_size": True,
                          "max_tokens_per_gpu": 64}),
    (1, 2, "torch_dist", {"log_probs_chunk_size": 3}),
    (2, 2, "torch_dist", {"sequence_parallel": True}),  # odd lengths: padded to a multiple of TP
    (2, 2, "torch_dist", {"sequence_parallel": True, "qkv_format": "thd", "use_dynamic_batch_size": True,
                          "max_tokens_per_gpu": 64}),
    (1, 2, "torch_dist", {"context_parallel_size": 2}),  # lengths padded to a multiple of 2 x CP
    (2, 6, "torch_dist", {"pipeline_model_parallel_size": 3, "sequence_parallel": True}),
    (1, 6, "torch_dist", {"pipeline_model_parallel_size": 3, "context_parallel_size": 2}),
    (2, 4, "torch_dist", {"context_parallel_size": 2, "sequence_parallel": True}),
    (1, 2, "torch_dist", {"context_parallel_size": 2, "qkv_format": "thd", "use_dynamic_batch_size": True,
                          "max_tokens_per_gpu": 64}),  # runs padded (chunked head); one rank runs the packed stream
    (1, 2, "torch_dist", {"context_parallel_size": 2, "log_probs_chunk_size": 3}),  # hidden states gathered
    (1, 2, "torch_dist", {"use_distributed_optimizer": True}),
    (2, 4, "torch_dist", {"use_distributed_optimizer": True})],
    ids=["tp2_dist", "tp2_torch", "pp3", "pp3_thd", "dp2", "tp2_sp", "tp2_sp_thd", "cp2", "tp2_sp_pp3", "cp2_pp3",
         "cp2_tp2_sp", "cp2_thd", "cp2_chunk", "dp2_distopt", "tp2_dp2_distopt"])
def test_ranks_equal_one(tiny_ckpt, tmp_path, tp, world, fmt, extra):
    single = {k: v for k, v in extra.items() if k not in ("pipeline_model_parallel_size", "sequence_parallel",
                                                           "context_parallel_size", "use_distributed_optimizer")}
    one = make(MegatronTrainRank, tiny_ckpt, **OVER, **single)
    try:
        want = [one.train_step(batch(s)) for s in range(2)]
        want_w = dict(one.full_named_parameters())
    finally:
        one.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_tp_rank, args=(r, port, tiny_ckpt, str(tmp_path / "ck"), tp, world, fmt, extra))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * world
    results = [torch.load(tmp_path / f"ck.rank{r}", weights_only=False) for r in range(world)]
    got, got_w, _ = results[0]
    assert all(r[1] is None for r in results[1:])  # only global rank 0 holds the gathered weights
    held = [r[2] for r in results]
    if extra.get("use_distributed_optimizer"):  # each data-parallel rank keeps a share; the shares add up
        assert all(0 < h < n for h, n, _ in held)
        for t in range(tp):  # TP is the fastest-varying rank index: the data-parallel peers of TP rank t
            assert sum(h for h, _, _ in held[t::tp]) == held[t][1]
    else:
        assert all(h == n for h, n, _ in held)
    for w, g in zip(want, got, strict=True):
        for k in ("loss", "pg_loss", "kl_loss", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
    assert got_w.keys() == want_w.keys()
    assert_adam_weights_close([got_w[k] for k in want_w], list(want_w.values()))
    assert (tmp_path / "ck" / "iter_0000002" / "mp_rank_01" / "model_optim_rng.pt").exists() == (
        tp == 2 and fmt == "torch")
    saved = read_hf_weights(tmp_path / "ck")
    assert all(torch.equal(saved[k], got_w[k]) for k in got_w)
    if fmt == "torch_dist":  # the layout does not depend on the TP size: one rank resumes what two ranks saved
        one = make(MegatronTrainRank, tiny_ckpt, **OVER, **single)
        try:
            one.load_state(str(tmp_path / "ck"))
            loaded = dict(one.full_named_parameters())
            assert one.steps_done == 2 and len(one.opt.state) == len(list(one.gpt.parameters()))
            if tp == 1 and "pipeline_model_parallel_size" not in extra:  # every share of the moments came back
                moments = {n: one.opt.state[p]["exp_avg"] for n, p in one.gpt.named_parameters()}
                shares = [m for _, _, ms in held for m in ms.items()]
                assert len(shares) == len(moments) * (1 if extra.get("use_distributed_optimizer") else world)
                assert all(torch.equal(moments[n], m) for n, m in shares)
        finally:
            one.shutdown()
        assert all(torch.equal(loaded[k], got_w[k]) for k in got_w)
