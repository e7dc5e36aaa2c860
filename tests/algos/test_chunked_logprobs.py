"""--log-probs-chunk-size: log-probs and entropies through the LM head in chunks equal the plain path, values and
gradients, and a hand-computed case."""

import math

import pytest
import torch

from streamrl.algos import entropy_from_logits, token_log_probs
from streamrl.algos.chunked_logprobs import chunked_log_probs


def test_hand_computed_two_token_vocabulary():
    # logits [1, 0]: ℓ(token 0) = 1 − log(e + 1), H = log(e + 1) − e / (e + 1)
    lp, ent = chunked_log_probs(torch.tensor([[1.0]]), torch.tensor([[1.0], [0.0]]), torch.tensor([0]))
    lse = math.log(math.e + 1)
    assert lp.item() == pytest.approx(1 - lse, abs=1e-6)
    assert ent.item() == pytest.approx(lse - math.e / (math.e + 1), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_plain_path(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    n, c, v = 37, 8, 50
    # float64, so that the comparison is tight (gradcheck below; fp32 agrees to ~1e-5)
    h0 = torch.randn(n, c, generator=g, dtype=torch.float64)
    w0 = torch.randn(v, c, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    # the weights of a loss that uses both outputs
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logits = h @ w.t()
    ref_lp, ref_ent = token_log_probs(logits, targets, temperature), entropy_from_logits(logits, temperature)
    ((a * ref_lp).sum() + (b * ref_ent).sum()).backward()

    hc, wc = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    lp, ent = chunked_log_probs(hc, wc, targets, temperature, chunk=chunk)
    ((a * lp).sum() + (b * ent).sum()).backward()
    for x, y in ((lp, ref_lp), (ent, ref_ent), (hc.grad, h.grad), (wc.grad, w.grad)):
        torch.testing.assert_close(x.detach(), y.detach(), atol=1e-10, rtol=1e-10)


def test_entropy_as_a_metric_has_no_gradient():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(9, 4, generator=g, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=g)
    lp, ent = chunked_log_probs(h, w, t, chunk=4, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    lp.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    token_log_probs(h2 @ w2.t(), t).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: chunked_log_probs(h, w, t, 0.8, chunk=2), (h, w))


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk"):
        chunked_log_probs(torch.zeros(1, 1), torch.zeros(2, 1), torch.tensor([0]), chunk=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_log_probs(torch.zeros(1, 1), torch.zeros(2, 1), torch.tensor([0]), temperature=0.0)


def test_response_log_probs_through_the_chunked_head_equal_the_plain_path():
    """The HF model with its lm_head swapped (--log-probs-chunk-size 3): same log-probs, entropies and parameter
    gradients as the full-logits path, the same state-dict names and a still-tied head."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from streamrl.algos import response_log_probs
    from streamrl.algos.logprobs import ChunkedLogProbHead, use_chunked_log_probs

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    plain = Qwen3ForCausalLM(cfg)
    chunked = Qwen3ForCausalLM(cfg)
    chunked.load_state_dict(plain.state_dict())
    use_chunked_log_probs(chunked, 3)
    assert isinstance(chunked.lm_head, ChunkedLogProbHead)
    assert chunked.lm_head.weight is chunked.model.embed_tokens.weight
    assert set(chunked.state_dict()) == set(plain.state_dict())
    tokens = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 3, 3, 3]]
    prompts, resp = [2, 1, 3], [4, 2, 1]
    outs = []
    for m in (plain, chunked):
        r = response_log_probs(m, tokens, prompts, resp, temperature=0.9, with_entropy=True)
        ((r.log_probs * 2.0).sum() + r.entropy.sum()).backward()
        outs.append((r, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (a, ga), (b, gb) = outs
    for x, y in ((a.log_probs, b.log_probs), (a.entropy, b.entropy), (a.mask, b.mask)):
        torch.testing.assert_close(x.detach(), y.detach(), atol=1e-5, rtol=1e-5)
    assert b.log_probs[2, 1:].eq(0).all()  # padding stays zero
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4)
    # outside scoring the head is a plain LM head
    torch.testing.assert_close(chunked(torch.tensor([[1, 2]])).logits, plain(torch.tensor([[1, 2]])).logits)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_fused_chunks_equal_the_eager_ones(entropy_grad):
    """--use-torch-compile: the per-chunk work compiled (a shorter last chunk included) gives the eager values and
    gradients (fp32; inductor may reorder the reductions)."""
    g = torch.Generator().manual_seed(3)
    n, c, v = 23, 8, 50
    h0, w0 = torch.randn(n, c, generator=g), torch.randn(v, c, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    out = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, ent = chunked_log_probs(h, w, targets, 0.7, chunk=10, entropy_grad=entropy_grad, fused=fused)
        ((a * lp).sum() + (b * ent).sum() if entropy_grad else (a * lp).sum()).backward()
        out.append((lp.detach(), ent.detach(), h.grad, w.grad))
    for x, y in zip(*out, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
