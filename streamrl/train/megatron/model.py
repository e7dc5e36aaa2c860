"""Build a Megatron-core `GPTModel` (local layer spec) from Megatron's flags and the HF config, and wrap it so that
the one RL step (`streamrl/train/step.py`) runs it as it runs an HF model: `forward(input_ids=, attention_mask=)`
returns the logits [B, L, V] (vocabulary padding cut off).

Departures from Megatron's stock local spec (the first two so that the same code runs on CPU (CI, gloo) and GPU):
- core attention is `SDPAttention` (torch's scaled_dot_product_attention, causal, GQA without repeating K/V);
  Megatron's local `DotProductAttention` allocates its score buffer with `torch.cuda.current_device()` and forks
  the CUDA RNG tracker. TransformerEngine's attention is not used (not a dependency).
- on CPU the rotary embedding stays on the host (`_HostRotaryEmbedding`): Megatron moves `inv_freq` to the
  current CUDA device at the first forward.
- a packed (thd) stream gets its RoPE in the core attention, from per-token frequencies (`PackedRope`), not from
  Megatron's thd path, which applies it one sample at a time in a Python loop with a host sync per sample.
Right padding needs no attention mask: under the causal mask real tokens never see the padding after them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from torch import Tensor

from streamrl.algos.logprobs import ChunkedLogProbHead
from streamrl.train.attention import packed_causal_attention
from streamrl.train.megatron import context
from streamrl.train.megatron.arch import resolve_arch
from streamrl.train.megatron.convert import Arch, hf_to_megatron, tp_shard
from streamrl.train.megatron.parallel import gather_along
from streamrl.train.megatron.pipeline import Stage, broadcast, receive_input, stage_tensors, to_next_stage


class SDPAttention(MegatronModule):
    """Core attention with DotProductAttention's signature: q [sq, b, np, d], k/v [sk, b, ng, d] -> [sq, b, np*d]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: Any = None, attention_bias: Any = None, packed_seq_params: Any = None) -> Tensor:
        # one dtype: under --bf16 autocast the q/k norms and rotary embedding may hand back fp32 next to a bf16 value
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":  # q [t, np, d], k/v [t, ng, d]
            freqs = getattr(packed_seq_params, "rotary_freqs", None)
            if freqs is not None:  # the whole stream at once, Megatron's own (unfused) RoPE math
                query, key = (apply_rotary_pos_emb(x.unsqueeze(1), freqs, self.config).squeeze(1) for x in (query, key))
            q, k, v = (x.to(value.dtype) for x in (query, key, value))
            out = packed_causal_attention(q, k, v, packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q,
                                          self.softmax_scale)
            return out.reshape(out.shape[0], -1)  # Megatron reshapes it to [t, 1, np*d]
        mask = None
        if context.cp_size() > 1:  # this rank's queries against every CP rank's keys (context.py)
            key, value = context.gather_kv(key, 0), context.gather_kv(value, 0)
            mask = context.causal_mask(query.shape[0], query.device)
        q, k, v = (x.to(value.dtype).permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


class SequenceParallelNorm:
    """Megatron's WrappedTorchNorm (torch's RMSNorm) under --sequence-parallel. WrappedTorchNorm refuses it only
    because it does not tag its weight for the TP all-reduce of the gradient, which each rank's part of the sequence
    leaves partial; the rank does that all-reduce itself (`MegatronTrainRank._clip_grad_norm`)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kw: Any) -> torch.nn.Module:
        whole = copy.copy(config)
        whole.sequence_parallel = False
        return WrappedTorchNorm(whole, hidden_size, eps, **kw)


@dataclasses.dataclass
class PackedRope(PackedSeqParams):
    """Megatron's thd parameters plus each token's rotary frequencies [t, 1, 1, d] (positions restart per sample),
    which `SDPAttention` applies to the whole stream."""

    rotary_freqs: Tensor | None = None


class _Rotary(RotaryEmbedding):
    """Megatron's RoPE table; none for a packed stream (its RoPE travels in `PackedRope`)."""

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: Any = None) -> Tensor | None:
        return None if packed_seq else super().forward(max_seq_len, offset, packed_seq, cp_group)


class _HostRotaryEmbedding(_Rotary):
    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: Any = None) -> Tensor | None:
        if packed_seq:
            return None
        emb = self.get_emb(max_seq_len, offset)  # Megatron's CP slice moves an index to CUDA: the same on the host
        return context.split(emb, 0) if context.cp_size() > 1 else emb


def build_gpt(args: argparse.Namespace, cfg: Any, device: torch.device) -> tuple[GPTModel, Arch]:
    """An fp32 GPTModel of the HF config's shape on `device` (weights uninitialised: load them next)."""
    arch, v = resolve_arch(args, cfg)
    pp = args.pipeline_model_parallel_size
    if v["num_layers"] % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp}: the model's {v['num_layers']} layers do not split "
                         "evenly over the stages")
    tc = TransformerConfig(
        num_layers=v["num_layers"], hidden_size=v["hidden_size"], ffn_hidden_size=v["ffn_hidden_size"],
        num_attention_heads=v["num_attention_heads"], num_query_groups=v["num_query_groups"],
        kv_channels=v["kv_channels"], normalization="RMSNorm", layernorm_epsilon=v["norm_epsilon"],
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        qk_layernorm=arch.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=args.tensor_model_parallel_size, context_parallel_size=args.context_parallel_size,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32 if pp > 1 else None,
        sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
        params_dtype=torch.float32, use_cpu_initialization=device.type == "cpu", perform_initialization=False,
        **({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
           if args.recompute_granularity == "full" else {}),
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if tc.sequence_parallel:  # every norm, and the final one through the block's own spec
        layer = spec.submodules
        layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelNorm
        if arch.qk_layernorm:
            layer.self_attention.submodules.q_layernorm = SequenceParallelNorm
            layer.self_attention.submodules.k_layernorm = SequenceParallelNorm
        spec = TransformerBlockSubmodules(layer_specs=[spec] * (tc.num_layers // pp), layer_norm=SequenceParallelNorm)
    model = GPTModel(tc, spec, vocab_size=arch.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
                     position_embedding_type="rope", rotary_base=int(v["rotary_base"]),
                     # with PP the last stage keeps its own copy of a tied embedding (pipeline.py)
                     share_embeddings_and_output_weights=arch.tied and pp == 1, parallel_output=True,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    model.rotary_pos_emb.__class__ = _HostRotaryEmbedding if device.type == "cpu" else _Rotary
    return model.to(device), arch


class MegatronChunkedHead(ChunkedLogProbHead):
    """`--log-probs-chunk-size` (and the packed path) on the Megatron backend: the ChunkedLogProbHead protocol
    (`scoring(...)`, then [B, R, 2] log-prob/entropy of the response positions, N tokens at a time), reading the
    output weight live from the GPTModel (tied embedding or output layer, vocabulary padding cut off) so that it
    follows the weights through offload and checkpoint loads. TP=1: the weight is whole. With context parallelism
    it scores the whole sequences' hidden states, gathered over CP."""

    def __init__(self, gpt: GPTModel, vocab_size: int, chunk: int):
        torch.nn.Module.__init__(self)
        self.__dict__["_gpt"] = gpt  # not a submodule: HFLikeModel already holds it
        self.vocab_size, self.chunk, self._request, self.fused = vocab_size, chunk, None, False

    @property
    def weight(self) -> Tensor:
        g = self._gpt
        w = g.shared_embedding_or_output_weight() if g.share_embeddings_and_output_weights else g.output_layer.weight
        w = w[: self.vocab_size]
        # under context parallelism every CP rank scores whole sequences: each adds 1/C of the head's weight
        # gradient, so that the sum over CP (rank.py) counts it once
        return context.scale_grad(w, 1 / context.cp_size()) if context.cp_size() > 1 else w

    @property
    def active(self) -> bool:
        return self._request is not None


class HFLikeModel(torch.nn.Module):
    """The GPTModel behind an HF causal LM's call: forward(input_ids=, attention_mask=) -> logits [B, L, V].

    `padding_idx`: the HF model's embedding padding index (its config's pad_token_id). HF never trains that row
    through the input lookup (nn.Embedding(padding_idx=...)); Megatron's embedding has no such index, so the
    gradient into looked-up pad tokens is zeroed here (the tied output layer still trains the row, as in HF)."""

    def __init__(self, gpt: GPTModel, arch: Arch, bf16: bool = False, padding_idx: int | None = None,
                 log_probs_chunk: int = 0, stage: Stage | None = None):
        super().__init__()
        self.gpt, self.arch, self.bf16, self.padding_idx = gpt, arch, bf16, padding_idx
        self.stage = stage  # None without pipeline parallelism
        # --sequence-parallel: Megatron splits the sequence over the TP ranks, so its length must divide by TP;
        # --context-parallel-size C: into 2C chunks (context.py)
        self.cp = gpt.config.context_parallel_size
        sp = gpt.config.tensor_model_parallel_size if gpt.config.sequence_parallel else 1
        self.seq_multiple = sp * (2 * self.cp if self.cp > 1 else 1)
        self.head = MegatronChunkedHead(gpt, arch.vocab_size, log_probs_chunk) if log_probs_chunk else None
        if padding_idx is not None and gpt.pre_process:
            gpt.embedding.word_embeddings.register_forward_hook(self._freeze_pad_lookup)

    def _freeze_pad_lookup(self, module: torch.nn.Module, inputs: tuple, out: Tensor) -> None:
        if out.requires_grad:
            keep = (inputs[0] != self.padding_idx).unsqueeze(-1).to(out.dtype)  # [B, L, 1]
            cfg = self.gpt.config
            if cfg.sequence_parallel:  # the lookup is [L/TP, B, H], this rank's part of L
                tp = cfg.tensor_model_parallel_size
                keep = keep.transpose(0, 1).chunk(tp)[parallel_state.get_tensor_model_parallel_rank()]
            out.register_hook(lambda g: g * keep)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cu_seq_lens_q: Tensor | None = None, max_length_q: int | None = None, **_: Any) -> Tensor:
        """Padded [B, L] (right padding, no mask needed), or one packed stream [1, N] with its boundaries
        (`cu_seq_lens_q`, `max_length_q`: packed.py's keywords) as Megatron's thd PackedSeqParams: RoPE restarts
        per sample and attention stays within it."""
        n = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        pad = -n % self.seq_multiple
        if pad:  # right padding (causal: real tokens never see it); a packed stream gets it as one more sample
            input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=self.padding_idx or 0)
            position_ids = torch.cat([position_ids, torch.arange(pad, device=input_ids.device).expand(
                position_ids.shape[0], pad)], dim=1)
            if cu_seq_lens_q is not None:
                cu_seq_lens_q = torch.cat([cu_seq_lens_q, cu_seq_lens_q[-1:] + pad])
                max_length_q = max(int(max_length_q), pad)
        out = self._forward(input_ids, position_ids, cu_seq_lens_q, max_length_q)
        return out[:, :n] if pad else out

    def _forward(self, input_ids: Tensor, position_ids: Tensor, cu_seq_lens_q: Tensor | None,
                 max_length_q: int | None) -> Tensor:
        packed = None
        if cu_seq_lens_q is not None:
            cu = cu_seq_lens_q.to(device=input_ids.device, dtype=torch.int32)
            table = self.gpt.rotary_pos_emb.get_emb(int(max_length_q))  # positions restart per sample: < max length
            packed = PackedRope(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(max_length_q),
                                max_seqlen_kv=int(max_length_q), rotary_freqs=table[position_ids.reshape(-1)])
        if self.cp > 1:  # this rank's two chunks of every sequence
            input_ids, position_ids = context.split(input_ids, 1), context.split(position_ids, 1)
        stage = self.stage
        if stage is not None and not stage.first:  # a later pipeline stage: its input is the previous one's output
            self.gpt.set_input_tensor(receive_input(stage))
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if stage is not None and not stage.last:  # hidden states on; the last stage's output comes back
                hidden = self.gpt(input_ids, position_ids, attention_mask=None, packed_seq_params=packed)
                return to_next_stage(hidden, stage)
            if self.head is not None and self.head.active:  # hidden states only, then the chunked head
                self.gpt.post_process = False  # GPTModel returns the decoder's output (final norm applied)
                try:
                    hidden = self.gpt(input_ids, position_ids, attention_mask=None, packed_seq_params=packed)
                finally:
                    self.gpt.post_process = True
                if self.cp > 1:  # whole sequences of hidden states (not of logits) to the head on every CP rank
                    hidden = context.gather_sequence(hidden, 0)
                return self._out(self.head(hidden.transpose(0, 1)))  # [B, R, 2]
            logits = self.gpt(input_ids, position_ids, attention_mask=None, packed_seq_params=packed)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            # vocabulary-parallel [.., Vp/t] -> [.., Vp] (Megatron's own gather allocates on the CUDA device)
            logits = gather_along(logits, -1, parallel_state.get_tensor_model_parallel_group())
        if self.cp > 1:
            logits = context.gather_sequence(logits, 1)
        return self._out(logits[..., : self.arch.vocab_size])

    def _out(self, out: Tensor) -> Tensor:
        if self.stage is not None:  # the last stage: its output to the other stages of the pipeline
            broadcast(out, self.stage)
        return out

    def get_output_embeddings(self) -> MegatronChunkedHead | None:
        """What the log-prob functions look for (algos/logprobs.py, train/packed.py): the chunked head or None."""
        return self.head


def load_hf_state(model: GPTModel, hf: dict[str, Tensor], arch: Arch, tp_rank: int, tp_size: int) -> None:
    """Load a full HF state dict into this TP rank's (and pipeline stage's) GPTModel (converted, vocabulary padded,
    sharded)."""
    full = hf_to_megatron(hf, arch)
    own = model.state_dict()
    try:
        mine = stage_tensors(full, model, arch.tied)
    except KeyError as e:
        raise KeyError(f"no HF tensor for Megatron parameter {e}") from None
    with torch.no_grad():
        for name, t in mine.items():
            dst = own[name]
            dst.copy_(tp_shard(name, t, tp_rank, tp_size).to(dst.dtype))
