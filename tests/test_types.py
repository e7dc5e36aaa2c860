"""Sample's single mutation point keeps every per-token list aligned; wire round trips through msgpack."""

import msgspec
import pytest

from streamrl.types import Sample, Status, decode_groups, encode, group_versions


def make(prompt_len=3) -> Sample:
    return Sample(index=7, group_id="g", tokens=list(range(prompt_len)))


def test_append_keeps_lengths_and_versions():
    s = make()
    s.append_response_tokens(tokens=[10, 11], log_probs=[-0.1, -0.2], version=0, finish_reason="abort")
    assert s.status is Status.ABORTED and s.weight_versions == ["0"]
    s.append_response_tokens(tokens=[12], log_probs=[-0.3], version=1, finish_reason="stop")
    assert s.tokens == [0, 1, 2, 10, 11, 12]
    assert (s.prompt_length, s.response_length) == (3, 3)
    assert s.rollout_log_probs == [-0.1, -0.2, -0.3]
    assert s.loss_mask == [1, 1, 1]
    assert s.token_versions == [0, 0, 1]
    assert s.weight_versions == ["0", "1"] and s.status is Status.COMPLETED
    assert group_versions([s, make()]) == (0, 1)


def test_non_trainable_tokens_are_masked():
    s = make()
    s.append_response_tokens(tokens=[5, 6], log_probs=None, version=2, trainable=False)
    assert s.loss_mask == [0, 0] and s.rollout_log_probs == [0.0, 0.0] and s.token_versions == [2, 2]
    assert s.effective_response_length == 0 and s.status is Status.PENDING


def test_mismatched_log_probs_raise():
    s = make()
    with pytest.raises(ValueError, match="one log-prob each"):
        s.append_response_tokens(tokens=[1, 2], log_probs=[-1.0], version=0)
    with pytest.raises(ValueError, match="unknown finish_reason"):
        s.append_response_tokens(tokens=[1], log_probs=[-1.0], version=0, finish_reason="eos")


def test_length_finish_and_reset():
    s = make()
    s.append_response_tokens(tokens=[9], log_probs=[-0.5], version=3, finish_reason="length")
    assert s.status is Status.TRUNCATED
    s.reward = 1.0
    s.reset_response("stale")
    assert s.tokens == [0, 1, 2] and s.response_length == 0 and s.token_versions == [] and s.reward is None
    assert s.status is Status.PENDING
    assert s.discarded_tokens == {"stale": 1} and s.generated_tokens == 1  # the ledger keeps the dropped token
    s.append_response_tokens(tokens=[5, 6], log_probs=[-0.1, -0.2], version=4)
    s.reset_response("stale")
    s.reset_response("abort")  # nothing held: nothing recorded
    assert s.discarded_tokens == {"stale": 3} and s.generated_tokens == 3


def test_msgpack_round_trip():
    s = make()
    s.append_response_tokens(tokens=[4], log_probs=[-0.25], version=1, finish_reason="stop")
    s.reward = 1.0
    back = decode_groups(encode([[s]]))[0][0]
    assert back == s
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(encode([[{"index": "x"}]]), type=list[list[Sample]])
