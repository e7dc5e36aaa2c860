"""Embedded engine decode speed vs HF `generate` on the same model in the same run (one JSON line per batch size).

Model: random-init Qwen3-0.6B shape (streamrl/models/tiny.py preset "qwen3-0.6b"), bf16 on CUDA. For each batch size
B: HF generate's ms per decode step (greedy, fixed length), the engine's ms per decode step (StaticKV: slot cache +
CUDA graphs, measured on the decode step alone), the engine's end-to-end tokens/s through the scheduler (prefill,
sampling and bookkeeping included), and the greedy agreement of the two on the first tokens.

    python scripts/bench/engine_throughput.py [--batches 1 8 32 64 256] [--new-tokens 64] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Row:  # the two fields StaticKV reads from a scheduler Request
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)


def main() -> None:
    import torch

    from streamrl.engine.protocol import SamplingParams
    from streamrl.engine.scheduler import Request, Scheduler
    from streamrl.engine.static_kv import StaticKV
    from streamrl.models.tiny import bench_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 64, 256])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    model, dev, dtype = bench_model(a.preset, max_positions=4096)
    cfg = model.config
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    results = []
    for b in a.batches:
        prompts = torch.randint(10, cfg.vocab_size, (b, a.prompt_len), generator=gen)
        # HF generate: time for prompt_len+new tokens minus time for 1 token ~ decode steps only
        ids = prompts.to(dev)

        def hf(n, ids=ids):
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            sync()
            return time.perf_counter() - t, out

        hf(4)  # warm-up
        t1, _ = hf(1)
        tn, hf_out = hf(a.new_tokens)
        hf_ms = 1e3 * (tn - t1) / (a.new_tokens - 1)

        # engine decode step alone
        kv = StaticKV(model, slots=max(b, 1), max_len=a.prompt_len + a.new_tokens + 8)
        with torch.inference_mode():
            rows = [_Row(prompts[i].tolist()) for i in range(b)]
            logits = kv.step(rows)[1]
            for step in range(a.new_tokens - 1):
                toks = logits.argmax(-1).tolist()
                for r, tok in zip(rows, toks, strict=True):
                    r.output_ids.append(tok)
                if step == 2:  # graphs captured and warm by now
                    sync()
                    t0 = time.perf_counter()
                logits = kv.step(rows)[1]
            sync()
            eng_ms = 1e3 * (time.perf_counter() - t0) / (a.new_tokens - 4)
        n_cmp = min(16, a.new_tokens - 1)
        agree = sum(
            r.output_ids[j] == hf_out[i, a.prompt_len + j].item() for i, r in enumerate(rows) for j in range(n_cmp)
        ) / (b * n_cmp)
        del kv

        # end to end through the scheduler (sampling, bookkeeping), greedy, fixed length
        sch = Scheduler(model, vocab_size=cfg.vocab_size, max_positions=4096, max_running_requests=max(b, 1),
                        max_context_len=a.prompt_len + a.new_tokens + 8)
        sch.start()
        done, ev = [], threading.Event()

        def on_event(o, done=done, ev=ev, b=b):
            done.append(o)
            if len(done) == b:
                ev.set()

        t0 = time.perf_counter()
        for i in range(b):
            sch.submit(Request(rid=f"r{i}", prompt_ids=prompts[i].tolist(), on_event=on_event,
                               params=SamplingParams(temperature=0.0, max_new_tokens=a.new_tokens, ignore_eos=True)))
        ev.wait(600)
        e2e = time.perf_counter() - t0
        sch.stop()
        row = {"bench": "engine_throughput", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               "model": a.preset, "dtype": str(dtype).replace("torch.", ""), "batch": b,
               "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
               "hf_generate_ms_per_step": round(hf_ms, 3), "engine_ms_per_step": round(eng_ms, 3),
               "speedup_per_step": round(hf_ms / eng_ms, 2),
               "hf_tok_per_s": round(b * 1e3 / hf_ms), "engine_decode_tok_per_s": round(b * 1e3 / eng_ms),
               "engine_e2e_tok_per_s": round(b * a.new_tokens / e2e), "greedy_agreement_first16": round(agree, 3)}
        print(json.dumps(row), flush=True)
        results.append(row)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
