"""Flags of slime's MIS example, OPSM and --tis-threshold: defaults resolved as slime resolves them, errors that
name the flag to change."""

import pytest

from streamrl.config import ConfigError, default_args


def test_rejection_sampling_bounds_default_to_slimes_chain():
    a = default_args(use_rs=True)  # --tis-clip-low 0 is unset: lower = 1 / --tis-clip, upper = --tis-clip
    assert a.use_tis and not a.use_rollout_logprobs
    assert (a.rs_lower_bound, a.rs_upper_bound) == (0.5, 2.0)
    a = default_args(use_rs=True, tis_clip=4.0, tis_clip_low=0.2)
    assert (a.rs_lower_bound, a.rs_upper_bound) == (0.2, 4.0)
    a = default_args(use_rs=True, rs_lower_bound=0.9, rs_upper_bound=1.1, rs_level="geometric")
    assert (a.rs_lower_bound, a.rs_upper_bound, a.rs_level) == (0.9, 1.1, "geometric")


def test_mis_flags_turn_tis_on_and_opsm_leaves_the_correction_alone():
    for over in ({"rs_veto_threshold": 1e-4}, {"tis_batch_normalize": True}):
        a = default_args(**over)
        assert a.use_tis and not a.use_rollout_logprobs
    a = default_args(use_opsm=True)
    assert a.use_rollout_logprobs and not a.use_tis and a.opsm_delta == 1e-4


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"use_rs": True, "disable_tis": True}, "--use-rs"),
        ({"rs_veto_threshold": 1e-4, "use_rollout_logprobs": True}, "--rs-veto-threshold"),
        ({"tis_batch_normalize": True, "custom_tis_function_path": "icepop"}, "--custom-tis-function-path"),
        ({"tis_batch_normalize": True, "tis_level": "geometric"}, "--tis-batch-normalize"),
        ({"rs_veto_threshold": 0.0}, "--rs-veto-threshold"),
        ({"rs_upper_bound": 3.0}, "--use-rs"),
        ({"use_rs": True, "rs_lower_bound": 3.0}, "--rs-lower-bound"),
        ({"tis_threshold": 0.9}, "--tis-clip"),
    ],
)
def test_errors_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        default_args(**overrides)
