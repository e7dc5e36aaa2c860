import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random-init Qwen3 with the in-repo tokenizer, saved as an HF directory."""
    from streamrl.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0))


@pytest.fixture(scope="session")
def sort_data(tmp_path_factory):
    from streamrl.tasks.synthetic import write_task_jsonl

    d = tmp_path_factory.mktemp("data")
    return str(write_task_jsonl(d / "train.jsonl", "sort", 400, seed=0)), str(
        write_task_jsonl(d / "eval.jsonl", "sort", 16, seed=1)
    )


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster per test module (4 CPUs, no dashboard), shut down after the module; yields `ray`."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run only where CUDA is available (scripts/gpu/check.sh runs them on a GPU)."""
    import importlib.util

    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
