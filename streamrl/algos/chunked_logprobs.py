"""Token log-probs and entropies through the LM head in chunks of tokens (slime's `--log-probs-chunk-size`).

The plain path (logprobs.py) materialises the logits of every position of a micro-batch, [B, L, V] in the model's
dtype, then fp32 copies of the response rows for the log-softmax and the entropy: with a 152k vocabulary that is
~3.7 GB per fp32 copy for 6k tokens, several of them alive at once, and autograd keeps one for backward. Here the
head runs on the response positions only, `chunk` tokens at a time: per chunk, logits = h Wᵀ (one matmul), then
z = logits / T in fp32, ℓ = z[target] − logsumexp(z) and H = logsumexp(z) − Σ p z. Only the logsumexp per token
is kept; backward recomputes each chunk's logits and applies

    ∂ℓ/∂z = onehot(target) − p,        ∂H/∂z = −p ⊙ (z − Σ p z),        ∂/∂logits = ∂/∂z / T

then ∂h = g W and ∂W += gᵀ h, so peak memory is one chunk's [chunk, V] fp32, whatever the micro-batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _chunk_logits(h: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """z = h Wᵀ / T in fp32 at least (fp64 stays fp64, for gradcheck)."""
    z = h @ weight.t()
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return z / temperature if temperature != 1.0 else z


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk: int,
                entropy_grad: bool):
        n = hidden.shape[0]
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
        ent = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s : s + chunk], weight, temperature)
            lz = torch.logsumexp(z, dim=-1)
            logp[s : s + chunk] = z.gather(1, targets[s : s + chunk, None])[:, 0] - lz
            ent[s : s + chunk] = lz - (torch.softmax(z, dim=-1) * z).sum(-1)
            lse[s : s + chunk] = lz
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.entropy_grad = temperature, chunk, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        hidden, weight, targets, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        use_ent = ctx.entropy_grad and g_ent is not None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            z = _chunk_logits(h, weight, t)
            p = torch.exp(z - lse[s : s + chunk, None])
            gz = torch.zeros_like(z)
            if g_logp is not None:
                gl = g_logp[s : s + chunk, None].to(z.dtype)
                gz = -p * gl
                gz.scatter_add_(1, targets[s : s + chunk, None], gl)
            if use_ent:
                mean_z = (p * z).sum(-1, keepdim=True)
                gz = gz - p * (z - mean_z) * g_ent[s : s + chunk, None].to(z.dtype)
            if t != 1.0:
                gz = gz / t
            gz = gz.to(weight.dtype)
            if need_h:
                g_h[s : s + chunk] = gz @ weight
            if need_w:
                g_w += (gz.t() @ h).to(acc)  # the chunk's product in the weights' dtype, summed in fp32
        return g_h, g_w.to(weight.dtype) if need_w else None, None, None, None, None


def chunked_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                      chunk: int = 4096, entropy_grad: bool = True) -> tuple[Tensor, Tensor]:
    """(ℓ [N], H [N]) for hidden states [N, C] (final norm applied), head weight [V, C] and target ids [N].

    Equal to `token_log_probs` / `entropy_from_logits` of the logits `hidden @ weight.T` (module docstring), in fp32.
    Gradients flow to `hidden` and `weight`; the entropy's only when `entropy_grad` (else it is a metric)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _ChunkedLogProbs.apply(hidden, weight, targets.long(), float(temperature), int(chunk), entropy_grad)
