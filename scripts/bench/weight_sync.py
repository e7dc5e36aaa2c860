"""Weight sync into a running engine on the same GPU, by each path, next to raw copies of the same bytes.

Engine: an EmbeddedEngine (HTTP) in a separate process on the GPU, as in training. Trainer side: this process holds
the model on the same GPU. Paths: CUDA IPC buckets (`/update_weights_from_ipc`), host round trip over HTTP
(`/update_weights_from_tensor`, msgpack), host-pinned shared memory (`/update_weights_from_pinned`),
disk (safetensors + `/update_weights_from_disk`); each wrapped in the
real pause -> push -> continue sequence. Raw: device-to-device copy and device-to-pinned-host copy of the same
bytes: one copy per parameter (what a naive sync costs) and one contiguous copy of the whole buffer (the
bandwidth ceiling). `cuda_ipc_from_fp32` packs fp32 master weights into bf16 buckets (the training path). Each path
is checked exact (engine checksums equal the trainer's). One JSON line.

    python3 -P scripts/bench/weight_sync.py [--preset qwen3-0.6b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main() -> None:
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from streamrl.engine.actor import spawn_engine_process
    from streamrl.models.tiny import tiny_config
    from streamrl.sync.base import sync_weights
    from streamrl.sync.cuda_ipc import stage_ipc
    from streamrl.sync.http_tensor import stage_named_tensors
    from streamrl.sync.pinned import stage_pinned
    from streamrl.sync.select import stage_disk

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--skip", nargs="*", default=[], help="paths to leave out (host_http takes ~40 s)")
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = tiny_config("qwen3", a.preset, vocab_size=88 if a.preset == "tiny" else None)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    ckpt = tempfile.mkdtemp()
    model.save_pretrained(ckpt)
    model = model.cuda()
    eng, url = spawn_engine_process(ckpt, device="cuda", dtype="bfloat16", max_running_requests=8)
    try:
        named = [(n, t.detach()) for n, t in model.named_parameters()]
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        bucket = a.bucket_mb * 2**20

        def perturb():
            with torch.no_grad():
                for _, t in named[:4]:
                    t.add_(0.001)

        def exact() -> bool:
            got = httpx.get(url + "/weights_checksum", timeout=60).json()
            want = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
            return all(abs(got[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])) for k in want)

        master = [(n, t.float()) for n, t in named]  # fp32 master weights, as the trainer holds them
        stages = {  # phase 1 (engine still generating) -> phase 2 push(urls), as the training loop runs them
            "cuda_ipc": lambda v: stage_ipc(named, v, bucket),
            "cuda_ipc_from_fp32": lambda v: stage_ipc(master, v, bucket, torch.bfloat16),
            "pinned": lambda v: stage_pinned(named, v, bucket),
            "host_http": lambda v: stage_named_tensors(named, v, bucket),
            "disk": lambda v: stage_disk(named, v, ckpt),
        }
        stages = {k: v for k, v in stages.items() if k not in a.skip}
        res, parts, version = {}, {}, 0
        for name, st in stages.items():
            times, stats = [], []
            for _ in range(a.reps if name in ("host_http", "disk") else 10 * a.reps):
                perturb()
                if name == "cuda_ipc_from_fp32":
                    with torch.no_grad():
                        for (_, t), (_, m) in zip(named, master, strict=True):
                            t.copy_(m)
                version += 1
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                held = {}
                stats.append(sync_weights([url], stage=lambda st=st, v=version, h=held: h.update(push=st(v)),
                                          push=lambda h=held: h["push"]([url]), publish=lambda: None,
                                          pause_while_staging=name.startswith("cuda_ipc")))
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            res[name] = {"s": round(med, 4), "GBps": round(nbytes / med / 1e9, 2), "exact": exact()}
            keys = ["sync_stage_time", "sync_pause_time", "sync_push_time", "sync_engine_downtime"]
            if name.startswith("cuda_ipc"):
                keys += ["sync_pack_wait_time"]
            if name.startswith(("cuda_ipc", "pinned")):
                keys += ["sync_engine_copy_time"]
            for k in keys:  # where the time goes (medians, ms)
                parts[f"{name}_{k.removeprefix('sync_').removesuffix('_time')}_ms"] = round(
                    1e3 * statistics.median(x[k] for x in stats), 2)

        flat = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        pinned = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)

        def raw(dst):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            off = 0
            for _, t in named:
                dst[off : off + t.numel()].copy_(t.reshape(-1), non_blocking=True)
                off += t.numel()
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        def raw_one(dst, src):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        d2d = statistics.median([raw(flat) for _ in range(5)])
        d2h = statistics.median([raw(pinned) for _ in range(5)])
        src = torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16)
        d2d_one = statistics.median([raw_one(flat, src) for _ in range(5)])
        print(json.dumps({
            "bench": "weight_sync", "device": torch.cuda.get_device_name(), "model": a.preset, "bytes": nbytes,
            **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("s", "GBps", "exact")},
            "raw_d2d_s": round(d2d, 4), "raw_d2d_GBps": round(nbytes / d2d / 1e9, 1),
            "raw_d2d_one_copy_s": round(d2d_one, 5), "raw_d2d_one_copy_GBps": round(nbytes / d2d_one / 1e9, 1),
            "raw_d2h_pinned_s": round(d2h, 4), "raw_d2h_pinned_GBps": round(nbytes / d2h / 1e9, 1),
            "cuda_ipc_vs_raw_d2d": round(d2d / res["cuda_ipc"]["s"], 3),
            "cuda_ipc_vs_raw_d2d_one_copy": round(d2d_one / res["cuda_ipc"]["s"], 3),
            "cuda_ipc_from_fp32_vs_raw_d2d": round(d2d / res["cuda_ipc_from_fp32"]["s"], 3), **parts,
            **({"host_http_vs_raw_d2h": round(d2h / res["host_http"]["s"], 3)} if "host_http" in res else {}),
            "pinned_vs_raw_d2h": round(d2h / res["pinned"]["s"], 3),
        }), flush=True)
    finally:
        eng.kill()


if __name__ == "__main__":
    main()
