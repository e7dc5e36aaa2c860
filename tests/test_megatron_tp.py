"""Two Megatron ranks on CPU (gloo), tensor parallel (TP=2) or data parallel (DDP), take the same RL steps as one
rank on the same batches: loss, grad norm (summed over the TP shards) and the weights gathered back to HF names;
the checkpoint holds one file per TP rank and reads back whole."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

from streamrl.train.megatron.checkpoint import read_hf_weights  # noqa: E402
from streamrl.train.megatron.rank import MegatronTrainRank  # noqa: E402
from tests.test_megatron_backend import batch, make  # noqa: E402

pytestmark = pytest.mark.slow
OVER = {"train_backend": "megatron", "use_kl_loss": True, "kl_loss_coef": 0.1}


def _tp_rank(rank: int, port: int, ckpt: str, out: str, tp: int, fmt: str, extra: dict) -> None:
    torch.set_num_threads(1)
    from streamrl.config import default_args

    # with torch_dist, TP=2 pads the vocabulary as TP=1 does (64 x 2 = 128), so that one rank can load the checkpoint
    args = default_args(hf_checkpoint=ckpt, rollout_batch_size=2, n_samples_per_prompt=4, micro_batch_size=4,
                        lr=1e-2, seed=1, tensor_model_parallel_size=tp, actor_num_gpus_per_node=2, ckpt_format=fmt,
                        make_vocab_size_divisible_by=128 // tp, **OVER, **extra)
    r = MegatronTrainRank(args, rank, 2)
    r.init("127.0.0.1", port)
    if extra:  # --log-probs-chunk-size under DDP: the wrapped model's chunked head is the one scoring
        from streamrl.algos.logprobs import output_head

        assert output_head(r.model) is r.model.module.head is not None
    try:
        metrics = [r.train_step(batch(s)) for s in range(2)]
        named = r.full_named_parameters()
        r.save_state(out)
    finally:
        r.shutdown()
    torch.save((metrics, dict(named) if named is not None else None), f"{out}.rank{rank}")


# two ranks: TP=2, or data parallel (DDP) with TP=1 (with the chunked LM head); both checkpoint formats
@pytest.mark.parametrize("tp,fmt,extra", [(2, "torch_dist", {}), (2, "torch", {}),
                                          (1, "torch_dist", {"log_probs_chunk_size": 3})])
def test_two_ranks_equal_one(tiny_ckpt, tmp_path, tp, fmt, extra):
    one = make(MegatronTrainRank, tiny_ckpt, **OVER, **extra)
    try:
        want = [one.train_step(batch(s)) for s in range(2)]
        want_w = dict(one.full_named_parameters())
    finally:
        one.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_tp_rank, args=(r, port, tiny_ckpt, str(tmp_path / "ck"), tp, fmt, extra))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [torch.load(tmp_path / f"ck.rank{r}", weights_only=False) for r in range(2)]
    got, got_w = results[0]
    assert results[1][1] is None  # only global rank 0 holds the gathered weights
    for w, g in zip(want, got, strict=True):
        for k in ("loss", "pg_loss", "kl_loss", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
    assert got_w.keys() == want_w.keys()
    assert max((got_w[k] - want_w[k]).abs().max().item() for k in want_w) < 1e-3  # Adam at lr 1e-2, as the 1-rank test
    assert (tmp_path / "ck" / "iter_0000002" / "mp_rank_01" / "model_optim_rng.pt").exists() == (
        tp == 2 and fmt == "torch")
    saved = read_hf_weights(tmp_path / "ck")
    assert all(torch.equal(saved[k], got_w[k]) for k in got_w)
    if fmt == "torch_dist":  # the layout does not depend on the TP size: one rank resumes what two ranks saved
        one = make(MegatronTrainRank, tiny_ckpt, **OVER, **extra)
        try:
            one.load_state(str(tmp_path / "ck"))
            loaded = dict(one.full_named_parameters())
            assert one.steps_done == 2 and len(one.opt.state) == len(list(one.gpt.parameters()))
        finally:
            one.shutdown()
        assert all(torch.equal(loaded[k], got_w[k]) for k in got_w)
