"""Faster kernels for a trainer model, applied before FSDP wraps it: `--use-liger-kernel`, `--use-torch-compile`.

Both keep the parameters and their names (state dicts, checkpoints and weight sync do not change). Liger-Kernel
swaps the forward of every RMSNorm (q/k norms included) and SwiGLU MLP of the instance for its Triton kernels and
the rotary embedding of the model family for its fused one; its fused linear cross-entropy stays off (the trainer
scores tokens itself, `ChunkedLogProbHead`). Compiling each decoder layer on its own, as torchtitan does, fuses the
elementwise work between the matmuls and keeps FSDP's per-layer hooks and activation checkpointing outside the
compiled graphs; the layers share one code object, so one compilation serves all of them. The chunked LM head's
log-softmax and entropy work is compiled with them (`fuse_head`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from streamrl.algos.logprobs import ChunkedLogProbHead
from streamrl.train.attention import register_varlen_attention

# model_type -> Liger's instance patch for that family
LIGER_FUNCTIONS = {"qwen3": "apply_liger_kernel_to_qwen3", "llama": "apply_liger_kernel_to_llama"}


def apply_liger(model: nn.Module) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU on `model` (an HF causal LM or its decoder)."""
    try:
        import liger_kernel.transformers as liger
    except ImportError as e:
        raise ImportError("--use-liger-kernel needs the liger-kernel package: pip install 'streamrl[liger]' (or "
                          f"bring its wheel to the GPU machine, docs/gpu.md): {e}") from None
    kind = model.config.model_type
    if kind not in LIGER_FUNCTIONS:
        raise ValueError(f"--use-liger-kernel: no Liger kernels wired for model type {kind!r} "
                         f"(have: {', '.join(LIGER_FUNCTIONS)}); drop the flag")
    getattr(liger, LIGER_FUNCTIONS[kind])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                          fused_linear_cross_entropy=False, model=model)


def compile_layers(layers: Any) -> None:
    """torch.compile every decoder layer in place (nn.Module.compile: names and hooks unchanged)."""
    for layer in layers:
        layer.compile()


def speed_up(args: Any, model: nn.Module, layers: Any) -> nn.Module:
    """The flags' kernels on one model (`layers`: its decoder layers); returns the model."""
    if args.use_liger_kernel:
        apply_liger(model)
    if args.use_torch_compile:
        compile_layers(layers)
        fuse_head(model)
    return model


def fuse_head(model: nn.Module) -> None:
    """The chunked LM head's per-chunk log-softmax/entropy work compiled (a model without one: nothing to do)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, ChunkedLogProbHead):
        head.fused = True


def attention_options(args: Any) -> dict[str, str]:
    """from_pretrained's keyword for --attn-implementation (registers "varlen" with transformers first)."""
    if args.attn_implementation == "varlen":
        register_varlen_attention()
    return {"attn_implementation": args.attn_implementation}
