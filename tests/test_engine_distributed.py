"""SGLang's distributed weight update against embedded engines in their own processes, over gloo on CPU: the
trainer (this process) is rank 0, each engine joins through /init_weights_update_group and receives the buckets
that /update_weights_from_distributed announces. The same code runs NCCL between GPUs."""

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from streamrl.engine.actor import spawn_engine_process
from streamrl.sync.base import sync_weights
from streamrl.sync.distributed import _SENDER, stage_distributed


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    procs = [spawn_engine_process(tiny_ckpt, device="cpu", max_running_requests=4) for _ in range(2)]
    yield [url for _, url in procs]
    _SENDER.close([])
    for proc, _ in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def trainer(tiny_ckpt):
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    return [(n, p.detach()) for n, p in model.named_parameters()]


def perturbed(named, seed):
    g = torch.Generator().manual_seed(seed)
    return [(n, t + 0.01 * torch.randn(t.shape, generator=g)) for n, t in named]


def assert_exact(url, named):
    got = httpx.get(url + "/weights_checksum", timeout=60).json()
    for n, t in named:
        assert got[n] == pytest.approx(float(t.double().sum()), rel=1e-12, abs=1e-9), n


def sync(urls, named, version, bucket_bytes=64 * 1024):
    return sync_weights(urls, stage=lambda: None, publish=lambda: None,
                        push=lambda: stage_distributed(named, version, bucket_bytes, torch.float32)(urls))


def test_one_then_two_engines_receive_the_trainers_weights_exactly(engines, trainer):
    named = perturbed(trainer, 1)
    stats = sync(engines[:1], named, 1)
    assert stats["sync_buckets"] > 3  # several buckets, the version on the last only
    assert_exact(engines[0], named)
    assert httpx.get(engines[0] + "/get_weight_version").json()["weight_version"] == "1"
    assert sync(engines[:1], perturbed(trainer, 2), 2)["sync_connect_time"] == 0.0  # the group is kept

    named = perturbed(trainer, 3)
    stats = sync(engines, named, 3)  # another engine set: the group is formed again with both
    assert stats["sync_connect_time"] > 0
    for url in engines:
        assert_exact(url, named)
        assert httpx.get(url + "/get_weight_version").json()["weight_version"] == "3"


def test_an_update_the_engine_cannot_load_fails_clearly_and_the_next_sync_recovers(engines, trainer):
    named = perturbed(trainer, 4)
    bad = [("model.no_such.weight", torch.ones(3))]
    with pytest.raises(RuntimeError, match=r"model\.no_such\.weight"):
        stage_distributed(bad, 9, 1 << 20)(engines)  # received (the broadcast completes), then refused
    for url in engines:
        assert httpx.get(url + "/get_weight_version").json()["weight_version"] != "9"
    sync(engines, named, 5)  # the group is formed again
    for url in engines:
        assert_exact(url, named)


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]],
                                          "group_name": "nope"}, "unknown group 'nope'"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 2,
                                    "world_size": 2, "group_name": "g", "backend": "gloo"}, "world_size 2"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0,
                                    "world_size": 2, "group_name": "g", "backend": "gloo"}, "rank 0 is the trainer"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                    "world_size": 2, "group_name": "g", "backend": "nccl"}, "use gloo on CPU"),
    ("/destroy_weights_update_group", {"group_name": "nope"}, "unknown group 'nope'"),
    ("/update_weights_from_distributed", {"names": ["x"]}, "dtypes"),
])
def test_bad_requests_are_400_naming_the_cause(engines, path, body, message):
    r = httpx.post(engines[0] + path, json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["success"] is False and message in r.json()["message"]
