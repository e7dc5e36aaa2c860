"""Checkpoint pieces without Ray: the trainer's state round trip on one FSDP2 CPU rank, and the directory layout."""

import pytest

from streamrl.config import default_args


@pytest.fixture
def rank(tiny_ckpt):
    import torch.distributed as dist

    from streamrl.train.fsdp import FSDPTrainRank

    r = FSDPTrainRank(default_args(hf_checkpoint=tiny_ckpt, lr=1e-2, train_torch_threads=1), 0, 1)
    r.init(*r.master_address())
    yield r
    if dist.is_initialized():
        dist.destroy_process_group()


def _step(r):
    """One optimizer step on a toy loss: changes weights and fills Adam's moments."""
    r.opt.zero_grad()
    sum(p.float().pow(2).sum() for p in r.model.parameters()).backward()
    r.opt.step()
    r.steps_done += 1


def test_trainer_state_round_trip(rank, tmp_path):
    import torch

    _step(rank)
    saved = {k: v.clone() for k, v in rank.full_named_parameters()}
    path = str(tmp_path / "trainer.pt")
    rank.save_state(path)
    _step(rank)  # move away, then come back
    assert any(not torch.equal(saved[k], v) for k, v in rank.full_named_parameters())
    rank.load_state(path)
    assert rank.steps_done == 1
    for k, v in rank.full_named_parameters():
        assert torch.equal(saved[k], v), k
    # the optimizer came back too: the same next step from the same state gives the same weights
    _step(rank)
    after_a = {k: v.clone() for k, v in rank.full_named_parameters()}
    rank.load_state(path)
    _step(rank)
    for k, v in rank.full_named_parameters():
        assert torch.equal(after_a[k], v), k


def test_checkpoint_dir_layout(tmp_path):
    from pipelines.checkpoint import commit_dir, latest_dir, staging_dir

    assert latest_dir(tmp_path) is None
    for k in (2, 4):
        tmp = staging_dir(tmp_path, k)
        (tmp / "x").write_text(str(k))
        (tmp / "meta.json").write_text("{}")
        commit_dir(tmp_path, k, tmp)
    assert latest_dir(tmp_path).name == "step_4"
    assert (latest_dir(tmp_path) / "x").read_text() == "4"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_version_labels_weights_trained_past_the_last_publish():
    from pipelines.checkpoint import resume_version

    # interval 3, saved after step 20: the last publish (v6) came after step 18; the weights are step 20's
    assert resume_version({"step": 20, "version": 6, "weights_published": False}, 3) == 7
    assert resume_version({"step": 18, "version": 6, "weights_published": True}, 3) == 6
    assert resume_version({"step": 20, "version": 6}, 3) == 7 and resume_version({"step": 21, "version": 7}, 3) == 7


def test_resume_flags_adapt_or_refuse_naming_the_flag():
    from pipelines.checkpoint import PACING_FLAGS, check_flags

    saved = default_args(rollout_batch_size=8, n_samples_per_prompt=4, max_staleness=1)
    meta = {"dir": "ck/step_4", "flags": {k: getattr(saved, k) for k in PACING_FLAGS}}
    now = default_args(rollout_batch_size=4, n_samples_per_prompt=4, max_staleness=2)
    assert check_flags(meta, now) == {"rollout_batch_size": (8, 4), "global_batch_size": (32, 16),
                                      "max_staleness": (1, 2)}
    assert check_flags({"dir": "old", "step": 4}, now) == {}  # a checkpoint from before the fingerprint
    with pytest.raises(ValueError, match=r"have 4 samples each but --n-samples-per-prompt is 2: resume with "
                                         r"--n-samples-per-prompt 4"):
        check_flags(meta, default_args(n_samples_per_prompt=2, rollout_batch_size=8))
