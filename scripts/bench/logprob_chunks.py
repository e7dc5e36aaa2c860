"""Peak memory and time of the trainer's log-prob pass: full logits vs `--log-probs-chunk-size`.

One forward + backward of `response_log_probs` (log-probs and entropy, as the actor's loss uses them) on a
Qwen3-shaped random model with the real 151,936-token vocabulary (2 layers, hidden 256 by default: the LM head is
what this measures), 8 samples of 32 prompt + 256 response tokens. Each variant runs in its own process; peak memory
is the process's peak RSS above its level after building the model (CPU) or torch's peak allocated (CUDA). Prints
one JSON line with both and their ratios.

    python3 -P scripts/bench/logprob_chunks.py [--chunk 512] [--samples 8] [--response 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(a: argparse.Namespace) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from streamrl.algos import response_log_probs
    from streamrl.algos.logprobs import use_chunked_log_probs

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = Qwen3Config(vocab_size=151936, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=a.hidden // 4, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg).to(dev)
    if a.variant == "chunked":
        use_chunked_log_probs(model, a.chunk)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 151936, (32 + a.response,), generator=g).tolist() for _ in range(a.samples)]

    def step() -> None:
        out = response_log_probs(model, tokens, [32] * a.samples, [a.response] * a.samples, temperature=0.8,
                                 with_entropy=True, entropy_grad=False)
        (out.log_probs.sum() / out.mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the high-water mark before the first pass: the model, the inputs, the interpreter
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # also the warm-up (allocator, kernels): timed passes follow
    t0 = time.perf_counter()
    for _ in range(a.reps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"s_per_pass": (time.perf_counter() - t0) / a.reps, "peak_mb": peak / 2**20, "device": dev}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:  # a child: one variant, one JSON line
        print(json.dumps(measure(a)))
        return
    res = {}
    for variant in ("plain", "chunked"):
        cmd = [sys.executable, "-P", __file__, "--variant", variant,
               *(f"--{k}={v}" for k, v in vars(a).items() if k != "variant")]
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    line = {"bench": "logprob_chunks", "device": res["plain"]["device"], "chunk": a.chunk,
            "response_tokens": a.samples * a.response, "vocab": 151936,
            "plain_peak_mb": round(res["plain"]["peak_mb"], 1), "chunked_peak_mb": round(res["chunked"]["peak_mb"], 1),
            "memory_ratio": round(res["plain"]["peak_mb"] / max(res["chunked"]["peak_mb"], 1e-9), 2),
            "plain_s": round(res["plain"]["s_per_pass"], 3), "chunked_s": round(res["chunked"]["s_per_pass"], 3),
            "time_ratio": round(res["plain"]["s_per_pass"] / res["chunked"]["s_per_pass"], 2)}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
