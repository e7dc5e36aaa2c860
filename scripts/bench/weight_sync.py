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

`--distributed`: the trainer on GPU 0 and one or two engines on GPUs 1 and 2 (CPU and gloo without GPUs: use
`--preset tiny`), synced by `--update-weight-transport distributed` (SGLang's weight-update group) in the same
sequence, next to a raw broadcast of the same bytes (one flat buffer) from this process to receivers on the same
devices, in the same run. Target: the sync at >= 80% of the raw broadcast's rate.

    python3 -P scripts/bench/weight_sync.py --distributed [--preset tiny]
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--distributed", action="store_true", help="NCCL/gloo broadcasts to engines on other devices")
    a = p.parse_args()
    if a.distributed:
        return bench_distributed(a)
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


def _raw_receiver(device: str, port: int, rank: int, world: int, nbytes: int, reps: int) -> None:
    """One receiving rank of the raw broadcast (a process of its own, on an engine's device)."""
    import torch

    from streamrl.weights.distributed import broadcast, destroy, new_group

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":  # this GPU only, as Ray places an engine (CUDA is not initialized yet in this process)
        os.environ["CUDA_VISIBLE_DEVICES"], device = device.removeprefix("cuda:"), "cuda:0"
    pg = new_group(backend, world, rank, "raw_broadcast", address="127.0.0.1", port=port)
    buf, ack = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.zeros(1, device=device)
    for _ in range(reps + 1):
        broadcast(pg, [buf])
        pg.allreduce([ack]).wait()
    destroy(pg)


def bench_distributed(a: argparse.Namespace) -> None:
    """`--distributed`: sync to one and two engines on other devices vs a raw broadcast of the same bytes."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from streamrl.engine.actor import spawn_engine_process
    from streamrl.models.tiny import tiny_config
    from streamrl.sync.base import sync_weights
    from streamrl.sync.distributed import _SENDER, stage_distributed

    gpus = torch.cuda.device_count()
    cuda = gpus >= 2
    devices = [f"cuda:{i}" for i in range(1, min(gpus, 3))] if cuda else ["cpu", "cpu"]
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    cfg = tiny_config("qwen3", a.preset, vocab_size=88 if a.preset == "tiny" else None)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    ckpt = tempfile.mkdtemp()
    model.save_pretrained(ckpt)
    dev = "cuda:0" if cuda else "cpu"
    model = model.to(dev)
    named = [(n, t.detach()) for n, t in model.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    engines, visible = [], os.environ.get("CUDA_VISIBLE_DEVICES")
    for d in devices:  # each engine sees its GPU only (CUDA_VISIBLE_DEVICES), as Ray places engines
        if cuda:
            os.environ["CUDA_VISIBLE_DEVICES"] = d.removeprefix("cuda:")
        engines.append(spawn_engine_process(ckpt, device="cuda" if cuda else "cpu", max_running_requests=8,
                                            dtype=str(dtype).removeprefix("torch.")))
    if cuda and visible is None:  # this process initialized CUDA with every GPU before: only children see it
        del os.environ["CUDA_VISIBLE_DEVICES"]
    elif cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    out: dict = {"bench": "weight_sync_distributed", "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "model": a.preset, "bytes": nbytes, "bucket_mb": a.bucket_mb}
    try:
        version = 0
        for n in range(1, len(engines) + 1):
            urls = [url for _, url in engines[:n]]
            times, stats = [], []
            for i in range(10 * a.reps + 1):  # the first forms the group: not timed
                with torch.no_grad():
                    named[0][1].add_(0.001)
                version += 1
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                held: dict = {}
                st = sync_weights(urls, publish=lambda: None, push=lambda h=held, u=urls: h["push"](u),
                                  stage=lambda v=version, h=held: h.update(push=stage_distributed(
                                      named, v, a.bucket_mb * 2**20)))
                if i:
                    times.append(time.perf_counter() - t0)
                    stats.append(st)
            med = statistics.median(times)
            want = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
            got = [httpx.get(u + "/weights_checksum", timeout=60).json() for u in urls]
            out.update({f"engines{n}_s": round(med, 4), f"engines{n}_GBps": round(nbytes / med / 1e9, 2),
                        f"engines{n}_exact": all(g[k] == want[k] for g in got for k in want)})
            for k in ("sync_push_time", "sync_engine_copy_time", "sync_pause_time", "sync_continue_time"):
                out[f"engines{n}_{k.removeprefix('sync_').removesuffix('_time')}_ms"] = round(
                    1e3 * statistics.median(x[k] for x in stats), 2)
            raw = _raw_broadcast(devices[:n], dev, nbytes, 10 * a.reps)
            out.update({f"raw{n}_s": round(raw, 4), f"raw{n}_GBps": round(nbytes / raw / 1e9, 2),
                        f"engines{n}_vs_raw": round(raw / med, 3)})
        print(json.dumps(out), flush=True)
    finally:
        _SENDER.close([])
        for proc, _ in engines:
            proc.kill()


def _raw_broadcast(devices: list[str], dev: str, nbytes: int, reps: int) -> float:
    """Median seconds of one broadcast of `nbytes` (one flat buffer) from this process to receivers on `devices`,
    each followed by a one-element all-reduce so that the time covers the receipt."""
    import multiprocessing as mp

    import torch

    from streamrl.weights.distributed import broadcast, destroy, host_store, new_group

    world = 1 + len(devices)
    store = host_store("127.0.0.1", world)
    procs = [mp.get_context("spawn").Process(target=_raw_receiver, args=(d, store.port, r + 1, world, nbytes, reps))
             for r, d in enumerate(devices)]
    for p in procs:
        p.start()
    pg = new_group("nccl" if dev.startswith("cuda") else "gloo", world, 0, "raw_broadcast", store=store)
    buf, ack, times = torch.ones(nbytes, dtype=torch.uint8, device=dev), torch.zeros(1, device=dev), []
    for i in range(reps + 1):
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        broadcast(pg, [buf])
        pg.allreduce([ack]).wait()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    for p in procs:
        p.join(60)
    destroy(pg)
    return statistics.median(times)


if __name__ == "__main__":
    main()
