"""--check-weight-update-equal compares in the engine's dtype: a bf16 engine synced from fp32 master weights is
exact when it holds the trainer's weights rounded to bf16, and any other value is a difference."""

import pytest
import torch

from pipelines.health import max_weight_diff


def test_bf16_engine_holding_rounded_fp32_weights_is_exact():
    w = torch.tensor([0.1, -1.2345678, 3.0e-3])
    assert max_weight_diff({"w": w}, {"w": w.to(torch.bfloat16)}) == 0.0
    assert max_weight_diff({"w": w}, {"w": w.clone()}) == 0.0


def test_a_wrong_value_is_reported_in_the_engines_precision():
    w = torch.tensor([1.0, 2.0])
    eng = w.to(torch.bfloat16)
    eng[1] = torch.tensor(2.015625, dtype=torch.bfloat16)  # one bf16 ulp above 2.0
    assert max_weight_diff({"w": w}, {"w": eng}) == pytest.approx(0.015625)
    assert 5e-7 < max_weight_diff({"w": w}, {"w": w + 1e-6}) < 3e-6  # an fp32 engine: fp32 precision


def test_a_parameter_the_engine_lacks_is_an_error():
    with pytest.raises(RuntimeError, match="engine lacks trainer parameters"):
        max_weight_diff({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)})
