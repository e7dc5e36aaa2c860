"""End to end: an async job checkpointed after K steps, then resumed with --load for the rest: nothing lost,
nothing trained twice, the resumed run starts at step K+1 with the saved weights."""

import json
from pathlib import Path

import pytest

from streamrl.config import default_args

pytestmark = pytest.mark.slow

K, TOTAL, B = 4, 6, 4  # steps in run 1, steps in all, groups per step


def _args(tiny_ckpt, sort_data, tmp_path, **kw):
    kw = {"save": str(tmp_path / "ckpt"), "check_weight_update_equal": True, **kw}
    return default_args(
        hf_checkpoint=tiny_ckpt, prompt_data=sort_data[0], label_key="label",
        custom_rm_path=str(Path(__file__).parent / "plugins" / "rewards.py") + ":digit_fraction",
        rollout_num_engines=1, actor_num_gpus_per_node=2, rollout_batch_size=B, n_samples_per_prompt=4,
        micro_batch_size=4, rollout_max_response_len=64, lr=1e-3, async_buffer_size=8, update_weights_interval=1,
        **{"max_staleness": 1, "partial_rollout": True, "save_interval": 2, **kw})


def _ledger(ckpt_dir: Path) -> dict:
    from buffers.persist import read_state

    return read_state(ckpt_dir / "buffer.msgpack")["ledger"]


def test_resume_loses_nothing_and_replays_nothing(ray_cluster, tiny_ckpt, sort_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.async_loop import run

    s1 = run(_args(tiny_ckpt, sort_data, tmp_path, num_rollout=K, run_dir=str(tmp_path / "run1"),
                   save_hf=str(tmp_path / "hf" / "iter_{rollout_id}")))
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == f"step_{K}" and (ckpt / "step_2").is_dir()
    meta1 = json.loads((ckpt / f"step_{K}" / "meta.json").read_text())
    assert meta1["step"] == K and meta1["version"] == K and s1["ledger"]["trained"] == K * B
    led1 = _ledger(ckpt / f"step_{K}")

    # the checkpoint holds the trainer's final weights (the HF model --save wrote at the end of run 1)
    saved = torch.load(ckpt / f"step_{K}" / "trainer.pt", weights_only=False)["policy"]
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).state_dict()
    assert all(torch.equal(saved[k], hf[k]) for k in saved if k in hf)
    # --save-hf: an HF export with each checkpoint, the step in its name
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [f"iter_{k}" for k in range(2, K + 1, 2)]
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf" / f"iter_{K}")).state_dict()
    assert all(torch.equal(saved[k], exported[k]) for k in saved if k in exported)

    s2 = run(_args(tiny_ckpt, sort_data, tmp_path, num_rollout=TOTAL, load=str(ckpt), run_dir=str(tmp_path / "run1")))
    assert s2["resumed_from"]["step"] == K
    assert s2["resume_weight_check"] == {"trainer_vs_checkpoint": 0.0, "engines_vs_trainer": 0.0}
    rows = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").open()]
    steps = [r["step"] for r in rows if "reward" in r]
    assert steps == list(range(1, TOTAL + 1))  # run 1's rows kept, run 2 continues at K+1

    led2 = _ledger(ckpt / f"step_{TOTAL}")
    st1, st2 = led1["state"], led2["state"]
    # nothing trained twice: each step trained exactly B groups, run 1's keep their steps, run 2 trained new ones
    trained2 = {g: led2["step"][g] for g, s in st2.items() if s == "trained"}
    assert sorted(trained2.values()) == sorted(s for s in range(TOTAL) for _ in range(B))
    trained1 = {g: led1["step"][g] for g, s in st1.items() if s == "trained"}
    assert len(trained1) == K * B and all(trained2[g] == step for g, step in trained1.items())
    assert min(step for g, step in trained2.items() if g not in trained1) == K  # first resumed step is K+1
    # nothing lost: every group run 1 admitted is still accounted for; unfinished ones were resumed or regenerated
    assert set(st1) <= set(st2)
    carried = [g for g, s in st1.items() if s in ("queued", "partial", "in_flight")]
    assert carried, "run 1 should end with groups queued or cut off"
    assert all(st2[g] in ("trained", "queued", "partial", "filtered", "failed", "dropped_stale") for g in carried)
    assert all(s in ("trained", "queued", "partial") for s in st2.values())
    assert s2["weight_check_max_diff"] == 0.0 and s2["version"] == TOTAL
    assert s1["tokens"]["balanced"] and s2["tokens"]["balanced"]  # the token ledger holds across the resume

    # resuming from the mid-run checkpoint (step 2): the groups in flight then are regenerated from their prompts
    mid = tmp_path / "mid"
    mid.mkdir()
    (ckpt / "step_2").rename(mid / "step_2")
    (mid / "latest").write_text("step_2")
    meta_mid = json.loads((mid / "step_2" / "meta.json").read_text())
    st_mid = _ledger(mid / "step_2")["state"]
    in_flight = [g for g, s in st_mid.items() if s == "in_flight"]
    assert len(in_flight) == meta_mid["regenerate"] > 0
    s3 = run(_args(tiny_ckpt, sort_data, tmp_path, num_rollout=K, load=str(mid), save=str(mid),
                   check_weight_update_equal=False, run_dir=str(tmp_path / "run3"), max_staleness=2))
    assert s3["resumed_from"]["changed_flags"] == {"max_staleness": (1, 2)} and s3["tokens"]["balanced"]
    led3 = _ledger(mid / f"step_{K}")
    assert s3["ledger"]["trained"] == K * B
    assert led3["reasons"].get("partial/regenerated at resume") == len(in_flight)
    assert all(led3["state"][g] in ("trained", "queued", "partial") for g in st_mid)
    assert all(led3["step"][g] == _ledger(mid / "step_2")["step"][g] for g, s in st_mid.items() if s == "trained")
