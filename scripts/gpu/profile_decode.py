"""Where a decode step's time goes on the GPU (graph replay, input staging, sampling). Prints JSON lines."""

import json
import time

import torch
from transformers import AutoModelForCausalLM

from streamrl.engine.sampling import sample_tokens
from streamrl.engine.static_kv import StaticKV
from streamrl.models.tiny import tiny_config


class Row:
    def __init__(self, p):
        self.prompt_ids, self.output_ids = p, []


def timeit(fn, n=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / n


cfg = tiny_config("qwen3", "qwen3-0.6b", max_positions=4096)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
@torch.inference_mode()
def profile(b: int) -> dict:
    kv = StaticKV(model, slots=b, max_len=256)
    rows = [Row(list(range(10, 74))) for _ in range(b)]
    kv.step(rows)
    for _ in range(2):
        for r in rows:
            r.output_ids.append(1)
        kv.step(rows)
    graph, _ = next(iter(kv._graphs.values()))
    res = {"batch": b, "graphs": [list(k) for k in kv._graphs], "replay_ms": timeit(graph.replay)}
    res["eager_decode_ms"] = timeit(lambda: kv._decode_eager(b, 128), 10)
    kv.lens = [70] * b
    res["decode_call_ms"] = timeit(lambda: kv._decode([1] * b))
    lg = torch.randn(b, cfg.vocab_size, device="cuda")
    t1, p1 = torch.ones(b, device="cuda"), torch.ones(b, device="cuda")
    k0 = torch.zeros(b, dtype=torch.long, device="cuda")
    res["sample_ms"] = timeit(lambda: sample_tokens(lg, t1, p1, k0))
    res["sample_tolist_ms"] = timeit(lambda: sample_tokens(lg, t1, p1, k0)[0].tolist())
    return res


for b in (1, 64):
    print(json.dumps(profile(b)), flush=True)
