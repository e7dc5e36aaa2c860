"""`train.py --colocate` on one GPU with a model that does not fit with trainer and engine resident together.

Model: random-init Qwen3-4B shape (hidden 2560, 36 layers, 32/8 heads, vocab 151936, tied embeddings; ~4.0B
parameters), built on the GPU in bf16 in a child process and saved under --model-dir. Sizes, computed below:
  trainer resident to train   fp32 master weights + fp32 gradients + AdamW's two moments = 16 bytes/parameter
  engine resident to generate --sglang-mem-fraction-static x the card (bf16 weights + the KV slots that fit it;
                              --sglang-server-concurrency and --engine-max-context-len are set so that it is full)
On a 141 GB H200 that is ~64 GB + ~85 GB: more than the card before any activation, so only taking turns fits.

Runs 2 steps of `train.py --colocate` (the sort task, 8 prompts x 4 samples, 64 tokens) while sampling the
card's used memory with nvidia-smi every 0.1 s from this process (which never opens a CUDA context itself), then
assigns the samples to the phases the run's metrics stamp (colocate_t_*: generation, release + onload, training,
sync, offload + resume) and prints one JSON line: peak GB per phase, the non-colocated estimate, step times.

    python3 -P scripts/gpu/colocate_memory.py --out $OUT/colocate      # about 4-6 minutes with model creation
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, vocab_size=151936)
BUILD = """
import sys, torch
from transformers import AutoModelForCausalLM, Qwen3Config
from streamrl.models.tokenizer import build_tokenizer
from streamrl.tasks.synthetic import write_task_jsonl
shape, out = eval(sys.argv[1]), sys.argv[2]
tok = build_tokenizer("")
cfg = Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
with torch.device("cuda"):  # seconds on the GPU instead of minutes of CPU init
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(out + "/model")
tok.save_pretrained(out + "/model")
write_task_jsonl(out + "/train.jsonl", "sort", 2000, seed=2)
"""


def n_params(shape: dict) -> int:
    h, f, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h + 2 * shape["head_dim"]  # attention, MLP, norms
    return v * h + n * layer + h  # tied embeddings, final norm


def gpu_used_mib() -> tuple[float, float]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits",
                          "-i", "0"], capture_output=True, text=True, check=True).stdout.split(",")
    return float(out[0]), float(out[1])


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), gpu_used_mib()[0]))
            time.sleep(0.1)


def phases(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(phase, start, end) from the colocate_t_* stamps of each step."""
    out = []
    for r in rows:
        end = r["colocate_t_offload"] + r.get("trainer_offload_time", 0) + r.get("colocate_resume_kv_time", 0)
        out += [("generation", r["colocate_t_generate"], r["colocate_t_release"]),
                ("release_onload", r["colocate_t_release"], r["colocate_t_train"]),
                ("training", r["colocate_t_train"], r["colocate_t_sync"]),
                ("sync", r["colocate_t_sync"], r["colocate_t_offload"]),
                ("offload_resume", r["colocate_t_offload"], end)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/colocate_memory/out")
    p.add_argument("--model-dir", default="runs/colocate_memory", help="model and data (8 GB; not under --out)")
    p.add_argument("--mem-fraction", type=float, default=0.6, help="--sglang-mem-fraction-static of the engine")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    t0 = time.time()
    data, out = ROOT / a.model_dir, Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "model" / "config.json").exists():
        subprocess.run([sys.executable, "-P", "-c", BUILD, repr(SHAPE), str(data)], cwd=ROOT, check=True)
    t_model = time.time() - t0
    params = n_params(SHAPE)
    card_gb = gpu_used_mib()[1] / 1024
    trainer_gb, engine_gb = params * 16 / 2**30, a.mem_fraction * card_gb
    run_dir = out / "run"
    argv = ["--hf-checkpoint", str(data / "model"), "--prompt-data", str(data / "train.jsonl"), "--label-key",
            "label", "--num-rollout", str(a.steps), "--rollout-batch-size", "8", "--n-samples-per-prompt", "4",
            "--rollout-max-response-len", "64", "--micro-batch-size", "8", "--lr", "1e-6", "--bf16", "--colocate",
            "--rollout-num-engines", "1", "--actor-num-gpus-per-node", "1", "--skip-eval-before-train",
            "--sglang-mem-fraction-static", str(a.mem_fraction), "--sglang-server-concurrency", "4096",
            "--engine-max-context-len", "1024", "--run-dir", str(run_dir)]
    sampler = Sampler()
    sampler.start()
    t1 = time.time()
    proc = subprocess.run([sys.executable, "-P", "train.py", *argv], cwd=ROOT)
    sampler.stop.set()
    sampler.join()
    line: dict = {"bench": "colocate_memory", "shape": "qwen3-4b", "params": params, "card_gb": round(card_gb, 1),
                  "trainer_resident_gb": round(trainer_gb, 1), "engine_resident_gb": round(engine_gb, 1),
                  "non_colocated_estimate_gb": round(trainer_gb + engine_gb, 1),
                  "fits_together": trainer_gb + engine_gb < card_gb, "returncode": proc.returncode,
                  "model_build_s": round(t_model, 1), "train_py_s": round(time.time() - t1, 1)}
    metrics = run_dir / "metrics.jsonl"
    rows = [r for r in (json.loads(x) for x in metrics.open()) if "colocate_t_train" in r] if metrics.exists() else []
    peaks: dict[str, float] = {}
    for name, start, end in phases(rows):
        inside = [m for t, m in sampler.samples if start <= t <= end]
        if inside:
            peaks[name] = max(peaks.get(name, 0.0), max(inside) / 1024)
    line["peak_gb"] = {k: round(v, 1) for k, v in peaks.items()}
    line["peak_gb_whole_run"] = round(max((m for _, m in sampler.samples), default=0) / 1024, 1)
    keys = ("train_time", "sync_total_time", "trainer_offload_time", "trainer_onload_time", "colocate_release_time",
            "colocate_resume_weights_time", "colocate_resume_kv_time", "trainer_gpu_bytes_asleep")
    line["steps"] = [{k: round(r[k], 3) for k in keys if k in r} for r in rows]
    (out / "colocate_memory.json").write_text(json.dumps(line))
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
