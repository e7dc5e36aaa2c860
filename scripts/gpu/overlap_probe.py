"""How much a training process and a decoding process on one GPU slow each other, with and without MPS.

Two separate processes, as in streamrl on one GPU: a trainer (Qwen3-0.6B shape, fp32 master weights, bf16 autocast,
fwd+bwd+AdamW on --train-batch x --train-len tokens) and a decoder (the embedded engine's StaticKV CUDA-graph decode
at --decode-batch). Each warms up, waits for a common start, runs for --seconds and reports its rate. Measured:
each alone, both together under the default time-slicing, and, when `nvidia-cuda-mps-control` exists, both
together under MPS (optionally the decoder limited by CUDA_MPS_ACTIVE_THREAD_PERCENTAGE). One JSON line.

    python3 -P scripts/gpu/overlap_probe.py [--seconds 12]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Row:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)


def worker(kind: str, go: str, seconds: float, a) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from streamrl.models.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("qwen3", "qwen3-0.6b", max_positions=4096)
    if kind == "train":
        torch.backends.cuda.matmul.allow_tf32 = True
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda()
        model.gradient_checkpointing_enable() if a.grad_ckpt else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        ids = torch.randint(10, cfg.vocab_size, (a.train_batch, a.train_len), device="cuda")

        def one():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return a.train_batch * a.train_len
    else:
        from streamrl.engine.static_kv import StaticKV

        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
        kv = StaticKV(model, slots=a.decode_batch, max_len=512)
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(10, cfg.vocab_size, (a.decode_batch, 32), generator=gen).tolist()
        state = {"rows": None, "logits": None}

        def one():
            if state["rows"] is None or len(state["rows"][0].output_ids) >= 400:
                kv.clear()
                state["rows"] = [_Row(p) for p in prompts]
                state["logits"] = kv.step(state["rows"])[1]
            rows = state["rows"]
            for r, t in zip(rows, state["logits"].argmax(-1).tolist(), strict=True):
                r.output_ids.append(t)
            state["logits"] = kv.step(rows)[1]
            return len(rows)

    with torch.inference_mode(kind != "train"):
        for _ in range(3 if kind == "train" else 500):
            one()
        torch.cuda.synchronize()
        open(go + "." + kind, "w").close()  # ready
        while not os.path.exists(go):
            time.sleep(0.001)
        n, it, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += one()
            it += 1
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    print(json.dumps({"kind": kind, "items_per_s": n / dt, "ms_per_iter": 1e3 * dt / it}), flush=True)


def run(kinds: list[str], seconds: float, env: dict, extra_env: dict | None = None) -> dict:
    go = tempfile.mktemp()
    procs = {}
    for k in kinds:
        e = dict(env)
        if extra_env and k in extra_env:
            e.update(extra_env[k])
        procs[k] = subprocess.Popen([sys.executable, "-P", __file__, "--worker", k, "--go", go,
                                     "--seconds", str(seconds), *sys.argv[1:]], env=e, stdout=subprocess.PIPE,
                                    text=True)
    while not all(os.path.exists(go + "." + k) for k in kinds):
        if any(p.poll() is not None for p in procs.values()):
            raise RuntimeError("a worker died before starting")
        time.sleep(0.05)
    open(go, "w").close()
    out = {}
    for k, p in procs.items():
        line = p.communicate()[0].strip().splitlines()[-1]
        out[k] = json.loads(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None)
    p.add_argument("--go", default=None)
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-len", type=int, default=320)
    p.add_argument("--decode-batch", type=int, default=128)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--engine-sm-percent", type=int, nargs="*", default=[30])
    a, _ = p.parse_known_args()
    if a.worker:
        return worker(a.worker, a.go, a.seconds, a)
    env = dict(os.environ)
    res: dict = {"bench": "overlap_probe"}
    alone_t = run(["train"], a.seconds, env)["train"]
    alone_d = run(["decode"], a.seconds, env)["decode"]
    res["train_alone_tok_s"], res["decode_alone_tok_s"] = alone_t["items_per_s"], alone_d["items_per_s"]

    def record(tag, both):
        ft = both["train"]["items_per_s"] / alone_t["items_per_s"]
        fd = both["decode"]["items_per_s"] / alone_d["items_per_s"]
        res[f"{tag}_train_frac"], res[f"{tag}_decode_frac"] = round(ft, 3), round(fd, 3)
        res[f"{tag}_sum"] = round(ft + fd, 3)  # > 1: the two overlap on the card; 1: pure time-slicing

    record("timeslice", run(["train", "decode"], a.seconds, env))
    mps = shutil.which("nvidia-cuda-mps-control")
    res["mps_available"] = bool(mps)
    if mps:
        d = tempfile.mkdtemp()
        menv = {**env, "CUDA_MPS_PIPE_DIRECTORY": d + "/pipe", "CUDA_MPS_LOG_DIRECTORY": d + "/log"}
        os.makedirs(d + "/pipe"), os.makedirs(d + "/log")
        started = subprocess.run([mps, "-d"], env=menv, capture_output=True, text=True)
        res["mps_start_rc"] = started.returncode
        try:
            if started.returncode == 0:
                record("mps", run(["train", "decode"], a.seconds, menv))
                for pct in a.engine_sm_percent:
                    record(f"mps_decode{pct}pct", run(["train", "decode"], a.seconds, menv,
                                                      {"decode": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(pct)}}))
        except Exception as e:  # noqa: BLE001 - report, then always stop the daemon
            res["mps_error"] = repr(e)[:300]
        finally:
            subprocess.run([mps], input="quit\n", env=menv, text=True, capture_output=True)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
