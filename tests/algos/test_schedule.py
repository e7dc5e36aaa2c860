"""The learning-rate schedule (Megatron's maths), by hand."""

import math

import pytest

from streamrl.train.schedule import lr_at


def test_warmup_then_constant():
    got = [lr_at(n, lr=1.0, warmup=4) for n in range(7)]
    assert got == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(2, lr=1.0, warmup=4, warmup_init=0.5) == 0.75


@pytest.mark.parametrize(("style", "mid"), [("linear", 0.5 * (1.0 + 0.1)), ("cosine", 0.1 + 0.9 * 0.5)])
def test_decay_to_min_lr(style, mid):
    # warm-up 2, decay until step 12: r = (n − 2) / 10; at n = 7, r = 1/2
    kw = dict(lr=1.0, style=style, warmup=2, decay_iters=12, min_lr=0.1)
    assert lr_at(1, **kw) == 0.5 and lr_at(2, **kw) == 1.0
    assert lr_at(7, **kw) == pytest.approx(mid)
    assert lr_at(12, **kw) == pytest.approx(0.1) and lr_at(13, **kw) == 0.1
    if style == "cosine":
        assert lr_at(4, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_decay_needs_its_length():
    with pytest.raises(ValueError, match="--lr-decay-iters"):
        lr_at(5, lr=1.0, style="cosine")
