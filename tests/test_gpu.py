"""GPU-only checks (skipped on CPU; `bash scripts/gpu/check.sh` runs them on a GPU machine)."""

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model(tiny_ckpt):
    from streamrl.rollout.engine.actor import load_model

    return load_model(tiny_ckpt, "cuda")


def test_cuda_graph_decode_matches_eager_and_hf_path(cuda_model):
    """fp32 on CUDA: the slot cache replayed as CUDA graphs gives the HF-cache path's greedy tokens."""
    from tests.test_engine_static import run

    a, b = run(cuda_model, "dynamic"), run(cuda_model, "static")
    for rid in a:
        assert a[rid][0] == b[rid][0], rid
        assert a[rid][1] == pytest.approx(b[rid][1], abs=1e-3)



@pytest.mark.parametrize("engine_dtype", ["float32", "bfloat16"])
def test_cuda_ipc_sync_is_exact(tiny_ckpt, engine_dtype):
    """A trainer process pushes new weights by CUDA IPC into an engine process on the same GPU; the engine's
    weights then equal the trainer's exactly (cast to the engine's dtype while packing), and its version moves."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from streamrl.rollout.sglang.proc import free_port
    from streamrl.sync.base import sync_weights
    from streamrl.sync.cuda_ipc import push_ipc

    port = free_port()
    code = ("import sys,time; from streamrl.rollout.engine.actor import EmbeddedEngine; "
            f"EmbeddedEngine(sys.argv[1], device='cuda', dtype='{engine_dtype}', port={port}).start(); "
            "time.sleep(1e9)")
    eng = subprocess.Popen([sys.executable, "-c", code, tiny_ckpt], env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).cuda()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        named = [(n, p.detach()) for n, p in model.named_parameters()]
        for version in (1, 2):  # the second sync reuses the exported buckets and opened handles
            sync_weights([url], push=lambda v=version: push_ipc([url], named, v, 1 << 20, getattr(torch, engine_dtype)),
                         publish=lambda: None)
            got = httpx.get(url + "/weights_checksum", timeout=60).json()
            dt = getattr(torch, engine_dtype)
            want = {k: float(v.to(dt).double().sum()) for k, v in model.state_dict().items()}
            assert got == pytest.approx(want, rel=0, abs=0)
            assert httpx.get(url + "/get_weight_version").json()["weight_version"] == str(version)
            with torch.no_grad():
                named[0][1].add_(1.0)
    finally:
        eng.kill()
