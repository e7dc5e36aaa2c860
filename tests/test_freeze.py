"""slime's --only-train-params-name-list / --freeze-params-name-list: regular expressions on the backend's parameter
names; frozen parameters keep their values through training steps, the others move (FSDP2 and Megatron ranks)."""

from __future__ import annotations

import pytest
import torch
from trainutil import make_rank, rl_batch

from streamrl.config import ConfigError, default_args
from streamrl.train.freeze import freeze_params


def test_patterns_set_requires_grad():
    named = [(n, torch.nn.Parameter(torch.zeros(1))) for n in ("embed.weight", "layers.0.q.weight",
                                                               "layers.1.q.weight", "head.weight")]
    assert freeze_params(named, None, None) == [] and all(p.requires_grad for _, p in named)
    assert freeze_params(named, [r"layers\.1\.", "^head"], None) == ["embed.weight", "layers.0.q.weight"]
    for _, p in named:
        p.requires_grad_(True)
    assert freeze_params(named, None, ["q"]) == ["layers.0.q.weight", "layers.1.q.weight"]
    with pytest.raises(ValueError, match="--freeze-params-name-list: 'lm_hed' matches no parameter"):
        freeze_params(named, None, ["lm_hed"])


def test_flags_are_checked():
    with pytest.raises(ConfigError, match="exclude each other"):
        default_args(only_train_params_name_list=["a"], freeze_params_name_list=["b"])
    with pytest.raises(ConfigError, match="not a regular expression"):
        default_args(freeze_params_name_list=["layers.(1"])


def _weights(rank) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rank.full_named_parameters()}


@pytest.mark.parametrize("backend,over,frozen", [
    ("fsdp", {"only_train_params_name_list": [r"layers\.1\.mlp"]}, lambda n: "layers.1.mlp" not in n),
    ("fsdp", {"freeze_params_name_list": ["embed_tokens", r"layers\.0\."]},
     lambda n: "embed_tokens" in n or "layers.0." in n),
    ("megatron", {"freeze_params_name_list": [r"decoder\.layers\.0\.", "word_embeddings"]},
     lambda n: "embed_tokens" in n or "layers.0." in n),
])
def test_frozen_parameters_stay_and_the_rest_trains(tiny_ckpt, backend, over, frozen):
    rank = make_rank(tiny_ckpt, backend, **over)
    try:
        before = _weights(rank)
        out = [rank.train_step(rl_batch(s)) for s in range(2)]
        after = _weights(rank)
    finally:
        rank.shutdown()
    assert all(r["grad_norm"] > 0 for r in out)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved == {k for k in before if not frozen(k)}, sorted(moved)
