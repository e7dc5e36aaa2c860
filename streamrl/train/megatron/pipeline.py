"""Pipeline parallelism for the Megatron rank (`--pipeline-model-parallel-size P`): each stage holds its slice of
the decoder (Megatron's `pre_process`/`post_process` GPTModel), activations go forward stage to stage and their
gradients back, with torch.distributed point-to-point calls (gloo on CPU, NCCL on GPU).

The step (`streamrl/train/step.py`) stays what it is on every rank: the last stage's output (log-probs of the
chunked head, or logits) is broadcast to the other stages of its pipeline, so every stage computes the same loss
and calls backward on it; a stage's backward then takes the gradient of its own output from the next stage
(`_ToNextStage`) and hands the gradient of its input to the previous one (a hook on the received tensor). Micro-
batches cross the pipeline one at a time (no 1F1B interleaving): the gain is memory (each GPU holds 1/P of the
layers), the bubble is (P-1)/P of the stage time.

Tied embeddings (Qwen3-0.6B): the last stage keeps its own copy of the embedding as output layer, loaded from the
same tensor; the two gradients are summed over Megatron's embedding group before the optimizer step, as
Megatron's finalize_model_grads does, and the copy is saved as a replica of the first stage's embedding.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]
_HEADER = 8  # ndim, dtype, up to 6 sizes
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
TIED_COPY = "output_layer.weight"  # the last stage's copy of a tied embedding
EMBEDDING = "embedding.word_embeddings.weight"


class Stage:
    """This rank's place in its pipeline (global ranks of the neighbours, the group)."""

    def __init__(self, device: torch.device):
        self.rank = parallel_state.get_pipeline_model_parallel_rank()
        self.size = parallel_state.get_pipeline_model_parallel_world_size()
        self.group = parallel_state.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(self.group)
        self.prev = ranks[self.rank - 1] if self.rank > 0 else None
        self.next = ranks[self.rank + 1] if self.rank < self.size - 1 else None
        self.ranks, self.device = ranks, device
        self.first, self.last = self.rank == 0, self.rank == self.size - 1


def _header(t: Tensor, device: torch.device) -> Tensor:
    if t.dim() > _HEADER - 2:
        raise ValueError(f"pipeline: a {t.dim()}-d tensor has too many dimensions to send")
    h = [t.dim(), _DTYPES.index(t.dtype), *t.shape]
    return torch.tensor(h + [0] * (_HEADER - len(h)), dtype=torch.int64, device=device)


def _empty(h: Tensor, device: torch.device) -> Tensor:
    h = h.tolist()
    return torch.empty(h[2: 2 + h[0]], dtype=_DTYPES[h[1]], device=device)


def send(t: Tensor, dst: int) -> None:
    dist.send(_header(t, t.device), dst)
    dist.send(t.contiguous(), dst)


def recv(src: int, device: torch.device) -> Tensor:
    h = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(h, src)
    t = _empty(h, device)
    dist.recv(t, src)
    return t


def broadcast(t: Tensor | None, stage: Stage) -> Tensor:
    """The last stage's tensor `t` on every stage of the pipeline (the others pass None)."""
    src = stage.ranks[-1]
    h = _header(t, stage.device) if stage.last else torch.empty(_HEADER, dtype=torch.int64, device=stage.device)
    dist.broadcast(h, src, group=stage.group)
    out = t.detach().contiguous() if stage.last else _empty(h, stage.device)
    dist.broadcast(out, src, group=stage.group)
    return out


class _ToNextStage(torch.autograd.Function):
    """Forward: send this stage's output on, return the pipeline's final output (broadcast by the last stage).
    Backward: the gradient of this stage's output comes from the next stage (the final output's own gradient is
    the last stage's to use)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, stage: Stage) -> Tensor:
        send(hidden.detach(), stage.next)
        ctx.stage = stage
        return broadcast(None, stage)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return recv(ctx.stage.next, ctx.stage.device), None


def receive_input(stage: Stage) -> Tensor:
    """A later stage's input: the previous stage's output; under autograd its gradient goes back there."""
    h = recv(stage.prev, stage.device)
    if torch.is_grad_enabled():
        h.requires_grad_(True)
        h.register_hook(lambda g: send(g, stage.prev))
    return h


def to_next_stage(hidden: Tensor, stage: Stage) -> Tensor:
    return _ToNextStage.apply(hidden, stage)


def layer_offset(gpt: Any) -> int:
    """The global index of this stage's first decoder layer (Megatron numbers layers from 1, globally)."""
    layers = gpt.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def is_tied_copy(gpt: Any, tied: bool, name: str) -> bool:
    return tied and name == TIED_COPY and not gpt.pre_process


def global_name(name: str, offset: int) -> str:
    m = _LAYER.match(name)
    return name if m is None else f"decoder.layers.{int(m.group(1)) + offset}.{name[m.end():]}"


def stage_tensors(full: dict[str, Tensor], gpt: Any, tied: bool) -> dict[str, Tensor]:
    """This stage's part of a whole model's Megatron state dict, under the stage's own (local) names."""
    offset = layer_offset(gpt)
    out = {}
    for name in gpt.state_dict():
        if name.endswith("_extra_state"):
            continue
        key = EMBEDDING if is_tied_copy(gpt, tied, name) else global_name(name, offset)
        out[name] = full[key]
    return out


def finalize_tied_grads(gpt: Any, tied: bool) -> None:
    """Sum the gradients of the first stage's embedding and the last stage's copy (Megatron's embedding group)."""
    if not tied or not (gpt.pre_process or gpt.post_process):
        return
    w = gpt.embedding.word_embeddings.weight if gpt.pre_process else gpt.output_layer.weight
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    dist.all_reduce(w.grad, group=parallel_state.get_embedding_group())


def gather_stages(named: list[tuple[str, Tensor]], stage: Stage, to_all: bool) -> list[tuple[str, Tensor]] | None:
    """Every stage's (name, tensor) list, in stage order, on the first stage (every stage with `to_all`); the
    names and shapes go first as objects, the tensors by broadcast from their stage."""
    metas: list[Any] = [None] * stage.size
    dist.all_gather_object(metas, [(n, t.shape, t.dtype) for n, t in named], group=stage.group)
    out: list[tuple[str, Tensor]] = []
    for s, meta in enumerate(metas):
        own = dict(named) if s == stage.rank else {}
        for name, shape, dtype in meta:
            t = own[name].contiguous() if s == stage.rank else torch.empty(shape, dtype=dtype, device=stage.device)
            dist.broadcast(t, stage.ranks[s], group=stage.group)
            if stage.first or to_all:
                out.append((name, t))
    return out if stage.first or to_all else None
