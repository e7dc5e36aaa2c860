"""SGLang launcher and router launcher failure paths on CPU: a fake server command stands in for SGLang."""

import os
import sys
from pathlib import Path

import pytest

from streamrl.config import default_args
from streamrl.rollout.sglang.launcher import SGLangServer, server_command
from streamrl.rollout.sglang.proc import LaunchError

FAKE = [sys.executable, str(Path(__file__).parent / "contract" / "fake_sglang_server.py")]


def sglang_args(**kw):
    return default_args(rollout_engine="sglang", hf_checkpoint="/models/qwen", rollout_num_gpus_per_engine=2,
                        rollout_engine_startup_timeout=30, **kw)


def test_server_command_owns_its_flags_and_forwards_changed_ones():
    args = sglang_args(sglang_mem_fraction_static=0.7, sglang_enable_metrics=True)
    argv = server_command(args, host="127.0.0.1", port=31000, nccl_port=31001)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    joined = " ".join(argv)
    for part in ("--model-path /models/qwen", "--tp-size 2", "--port 31000", "--nccl-port 31001",
                 "--mem-fraction-static 0.7", "--enable-metrics", "--weight-version 0", "--trust-remote-code"):
        assert part in joined
    assert "--log-level" not in joined  # unchanged passthrough values are not forwarded
    args.sglang_weight_version = "42"
    assert "--weight-version 42" in " ".join(server_command(args, host="h", port=1, nccl_port=2))


def start(args, mode, tmp_path, timeout=None):
    os.environ["FAKE_SGLANG_MODE"] = mode
    try:
        server = SGLangServer(args, launch=FAKE, log_dir=tmp_path)
        server.start()
        try:
            return server.wait_healthy(timeout)
        finally:
            server.stop()
    finally:
        del os.environ["FAKE_SGLANG_MODE"]


def test_healthy_server(tmp_path):
    assert start(sglang_args(), "ok", tmp_path).startswith("http://127.0.0.1:")


def test_server_dying_at_start_shows_its_log(tmp_path):
    with pytest.raises(LaunchError, match=r"(?s)exited with code 1.*CUDA error: out of memory \(fake\)"):
        start(sglang_args(), "die", tmp_path)


def test_flag_the_server_rejects_shows_its_log(tmp_path):
    with pytest.raises(LaunchError, match=r"(?s)--mem-fraction-static 1.5.*mem_fraction_static=1.5 must be"):
        start(sglang_args(sglang_mem_fraction_static=1.5), "ok", tmp_path)


def test_server_that_never_answers_times_out_with_its_log(tmp_path):
    with pytest.raises(LaunchError, match=r"(?s)did not answer within 2s.*fake sglang: model /models/qwen"):
        start(sglang_args(), "hang", tmp_path, timeout=2)


def test_router_that_fails_to_start_shows_its_log(tmp_path):
    pytest.importorskip("sglang_router")
    from streamrl.rollout.sglang.router import start_router

    args = default_args(use_router=True, router_max_payload_size=0, rollout_engine_startup_timeout=60)
    with pytest.raises(LaunchError, match=r"(?s)sglang-router.*exited with code.*max_payload_size"):
        start_router(args, [], log_path=str(tmp_path / "router.log"))
