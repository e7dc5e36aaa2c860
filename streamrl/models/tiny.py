"""Tiny random-init Qwen3- or Llama-style models, saved as normal HF directories (no hub access).

`build_tiny_model(out_dir, arch="qwen3", ...)` writes config, safetensors weights and the in-repo character
tokenizer, so `--hf-checkpoint out_dir` works for the engines and the trainer alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from streamrl.models.tokenizer import build_tokenizer

PRESETS = {
    # ~0.4M parameters: learns the demo tasks in minutes on 2 CPU cores.
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
    # The shape of Qwen3-0.6B (random init), for GPU measurements.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def tiny_config(arch: str = "qwen3", preset: str = "tiny", vocab_size: int | None = None, max_positions: int = 256):

    kw = dict(PRESETS[preset])
    kw["vocab_size"] = kw.get("vocab_size", vocab_size)
    if kw["vocab_size"] is None:
        raise ValueError("vocab_size is required for this preset")
    common = dict(max_position_embeddings=max_positions, tie_word_embeddings=True, rms_norm_eps=1e-6)
    if arch == "qwen3":
        return Qwen3Config(**kw, **common)
    if arch == "llama":
        return LlamaConfig(**kw, **common)
    raise ValueError(f"unknown arch {arch!r}; choose qwen3 or llama")


def bench_model(preset: str = "qwen3-0.6b", max_positions: int = 4096, seed: int = 0):
    """A random-init Qwen3 of `preset` in memory, for benchmarks: (model in eval mode, device, dtype); bf16 on CUDA,
    fp32 on CPU. The "tiny" preset gets the in-repo tokenizer's vocabulary size (88)."""

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(seed)
    cfg = tiny_config("qwen3", preset, vocab_size=None if preset != "tiny" else 88, max_positions=max_positions)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(dev).eval(), dev, dtype


def build_tiny_model(out_dir: str | Path, arch: str = "qwen3", preset: str = "tiny", seed: int = 0,
                     extra_chars: str = "", max_positions: int = 256) -> Path:
    """Create a random-init model with the in-repo tokenizer (plus `extra_chars`) and save both to `out_dir`."""
    tok = build_tokenizer(extra_chars)
    cfg = tiny_config(arch, preset, vocab_size=len(tok) if preset == "tiny" else None, max_positions=max_positions)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
