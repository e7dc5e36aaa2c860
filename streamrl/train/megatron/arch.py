"""The model's shape from the `--hf-checkpoint` config and Megatron's architecture flags, checked against each other
(no megatron import: preflight runs it before Ray starts, the ranks again when they build the model)."""

from __future__ import annotations

import argparse
from typing import Any

from streamrl.train.megatron.convert import Arch, arch_from_hf


def _hf_values(cfg: Any) -> dict[str, Any]:
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    return {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "ffn_hidden_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
            "num_query_groups": cfg.num_key_value_heads or cfg.num_attention_heads,
            "kv_channels": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "norm_epsilon": cfg.rms_norm_eps, "rotary_base": rope, "vocab_size": cfg.vocab_size}


def resolve_arch(args: argparse.Namespace, cfg: Any) -> tuple[Arch, dict[str, Any]]:
    """The model's shape from the HF config, each Megatron flag that is set checked against it (ValueError naming
    the flag). Returns the conversion's Arch and the resolved values by flag name."""
    values = _hf_values(cfg)
    for name, hf_value in values.items():
        given = getattr(args, name)
        if given is not None and given != hf_value:
            raise ValueError(f"--{name.replace('_', '-')} {given} disagrees with --hf-checkpoint "
                             f"{args.hf_checkpoint} ({hf_value})")
    arch = arch_from_hf(cfg, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    for flag, given, hf in (("--qk-layernorm", args.qk_layernorm, arch.qk_layernorm),
                            ("--untie-embeddings-and-output-weights", args.untie_embeddings_and_output_weights,
                             not arch.tied)):
        if args.num_layers is not None and given != hf:  # a model flag file was given: it must say the same
            raise ValueError(f"{flag} is {'set' if given else 'missing'} but --hf-checkpoint {args.hf_checkpoint} "
                             f"{'has' if hf else 'lacks'} it")
    return arch, values
