"""The FSDP trainer's speed flags: packed sequences, the attention kernel, torch.compile, Liger kernels.

Each one changes how the step is computed, never what: the packed path gives the padded path's log-probs, loss and
gradients (tests/test_packed.py; in bf16 on a GPU, tests/test_gpu_packed.py), and `scripts/bench/train_step.py`
measures every combination against the padded eager step in one run. The defaults are the eager padded path, which
is what CPU runs use.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from streamrl.config.field import F


@dataclass
class TrainSpeedConfig:
    qkv_format: str = F("bshd", "slime's/Megatron's: how the trainer lays out a micro-batch. bshd: samples padded to "
                                "the longest (the default); thd: packed, every sample's tokens back to back in one "
                                "stream with position ids restarting per sample and attention kept within each "
                                "sample, no padding computed, and the LM head run only on response tokens in "
                                "chunks (--log-probs-chunk-size, default 2048 here). With --use-dynamic-batch-size, "
                                "--max-tokens-per-gpu then counts real tokens. Policy, reference, teacher and "
                                "critic alike.", choices=["bshd", "thd"])
    attn_implementation: str = F("sdpa", "slime's FSDP flag: the attention kernel of the trainer's HF models. sdpa "
                                         "(default); flex_attention (a block mask that skips the blocks between "
                                         "samples with --qkv-format thd); varlen (FlashAttention's variable-length "
                                         "kernel inside torch, given the samples' boundaries: needs --qkv-format "
                                         "thd and bf16 on a GPU, else it falls back to exact per-sample SDPA); "
                                         "eager.", choices=["sdpa", "flex_attention", "varlen", "eager"])
    use_torch_compile: bool = F(False, "torch.compile each decoder layer of the trainer's models (torchtitan's "
                                       "per-block compile: fused elementwise kernels, fewer launches); the first "
                                       "steps pay the compilation. GPU.")
    use_liger_kernel: bool = F(False, "Liger-Kernel's Triton RMSNorm, RoPE and SwiGLU in the trainer's Qwen3/Llama "
                                      "models (optional extra `liger`: pip install liger-kernel). GPU.")


def validate_speed(args: argparse.Namespace, error: type[Exception]) -> None:
    if args.attn_implementation == "varlen" and args.qkv_format != "thd":
        raise error("--attn-implementation varlen needs packed micro-batches: add --qkv-format thd.")
    if args.qkv_format == "thd" and args.true_on_policy_mode:
        raise error("--true-on-policy-mode replays the engine's own padded decode path: drop --qkv-format thd.")
