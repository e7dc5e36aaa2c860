"""Token log-probs and entropies through the LM head in chunks of tokens (slime's `--log-probs-chunk-size`).

The plain path (logprobs.py) materialises the logits of every position of a micro-batch, [B, L, V] in the model's
dtype, then fp32 copies of the response rows for the log-softmax and the entropy: with a 152k vocabulary that is
~3.7 GB per fp32 copy for 6k tokens, several of them alive at once, and autograd keeps one for backward. Here the
head runs on the response positions only, `chunk` tokens at a time: per chunk, logits = h Wᵀ (one matmul), then
z = logits / T in fp32, ℓ = z[target] − logsumexp(z) and H = logsumexp(z) − Σ p z. Only the logsumexp per token
is kept; backward recomputes each chunk's logits and applies

    ∂ℓ/∂z = onehot(target) − p,        ∂H/∂z = −p ⊙ (z − Σ p z),        ∂/∂logits = ∂/∂z / T

then ∂h = g W and ∂W += gᵀ h, so peak memory is one chunk's [chunk, V] fp32, whatever the micro-batch size.

Between the matmuls the work per chunk (`_chunk_stats`, `_chunk_grad`) is elementwise passes and row reductions
over [chunk, V]: run eagerly, each pass is its own kernel that reads and writes the fp32 tensor. With `fused`
(`--use-torch-compile`) both functions are compiled, so each becomes a few fused kernels that read the matmul's
output once or twice and write only what they return: the same formulas, fp32 inside.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _chunk_logits(h: Tensor, weight: Tensor) -> Tensor:
    """h Wᵀ in the operands' dtype (bf16 under --bf16); the fp32 upcast happens in `_scaled`."""
    return h @ weight.t()


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """z = logits / T in fp32 at least (fp64 stays fp64, for gradcheck)."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return z / temperature if temperature != 1.0 else z


def _chunk_stats(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ, H, logsumexp) [n] of one chunk's logits [n, V] and target ids [n]."""
    z = _scaled(logits, temperature)
    lz = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None])[:, 0] - lz
    ent = lz - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, ent, lz


def _chunk_grad(logits: Tensor, targets: Tensor, lse: Tensor, g_logp: Tensor | None, g_ent: Tensor | None,
                temperature: float, out_dtype: torch.dtype) -> Tensor:
    """∂/∂logits [n, V] of Σ g_logp·ℓ + Σ g_ent·H over one chunk (formulas above), in `out_dtype`."""
    z = _scaled(logits, temperature)
    p = torch.exp(z - lse[:, None])
    if g_logp is not None:
        onehot = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
        gz = (onehot.to(z.dtype) - p) * g_logp[:, None].to(z.dtype)
    else:
        gz = torch.zeros_like(z)
    if g_ent is not None:
        mean_z = (p * z).sum(-1, keepdim=True)
        gz = gz - p * (z - mean_z) * g_ent[:, None].to(z.dtype)
    if temperature != 1.0:
        gz = gz / temperature
    return gz.to(out_dtype)


_EAGER = (_chunk_stats, _chunk_grad)
_compiled: tuple | None = None


def _kernels(fused: bool) -> tuple:
    """The per-chunk functions: eager, or compiled once per process (dynamic shapes: the last chunk is shorter)."""
    global _compiled
    if not fused:
        return _EAGER
    if _compiled is None:
        _compiled = tuple(torch.compile(f, dynamic=True) for f in _EAGER)
    return _compiled


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk: int,
                entropy_grad: bool, fused: bool):
        n = hidden.shape[0]
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
        ent = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        stats, _ = _kernels(fused)
        for s in range(0, n, chunk):
            c_logp, c_ent, c_lse = stats(_chunk_logits(hidden[s : s + chunk], weight), targets[s : s + chunk],
                                         temperature)
            logp[s : s + chunk], ent[s : s + chunk], lse[s : s + chunk] = c_logp, c_ent, c_lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.entropy_grad, ctx.fused = temperature, chunk, entropy_grad, fused
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        use_ent = ctx.entropy_grad and g_ent is not None
        _, grad = _kernels(ctx.fused)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            gz = grad(_chunk_logits(h, weight), targets[s : s + chunk], lse[s : s + chunk],
                      None if g_logp is None else g_logp[s : s + chunk], g_ent[s : s + chunk] if use_ent else None,
                      ctx.temperature, weight.dtype)
            if need_h:
                g_h[s : s + chunk] = gz @ weight
            if need_w:
                g_w += (gz.t() @ h).to(acc)  # the chunk's product in the weights' dtype, summed in fp32
        return g_h, g_w.to(weight.dtype) if need_w else None, None, None, None, None, None


def chunked_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                      chunk: int = 4096, entropy_grad: bool = True, fused: bool = False) -> tuple[Tensor, Tensor]:
    """(ℓ [N], H [N]) for hidden states [N, C] (final norm applied), head weight [V, C] and target ids [N].

    Equal to `token_log_probs` / `entropy_from_logits` of the logits `hidden @ weight.T` (module docstring), in fp32.
    Gradients flow to `hidden` and `weight`; the entropy's only when `entropy_grad` (else it is a metric).
    `fused`: the per-chunk elementwise work compiled (module docstring)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _ChunkedLogProbs.apply(hidden, weight, targets.long(), float(temperature), int(chunk), entropy_grad,
                                  fused)
