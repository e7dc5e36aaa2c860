"""streamrl.data: JSONL prompt loading (errors with file:line, skipped long prompts) and PromptSource stamping."""

from __future__ import annotations

import json

import msgspec
import pytest

from streamrl.data import DataError, PromptRecord, PromptSource, load_prompts


class CharTokenizer:
    """One token per character; a visible chat template. Records the calls it gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(("encode", text, add_special_tokens))
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append(("template", messages, tokenize, add_generation_prompt))
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )


def write(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_load_keys_labels_metadata(tmp_path):
    path = write(
        tmp_path,
        [
            {"q": "one", "a": "1", "meta": {"rm_type": "math"}},
            "",
            {"q": "two", "a": 2},
            {"q": [{"role": "user", "content": "three"}], "a": 3.5, "meta": None, "other": 1},
        ],
    )
    recs, skipped = load_prompts(path, "q", "a", "meta")
    assert skipped == []
    assert [r.line for r in recs] == [1, 3, 4]  # blank line skipped, line numbers kept
    assert [r.label for r in recs] == ["1", "2", "3.5"]
    assert recs[0].metadata == {"rm_type": "math"} and recs[1].metadata == {} and recs[2].metadata == {}
    assert recs[0].prompt == "one" and recs[2].prompt == [{"role": "user", "content": "three"}]
    assert all(r.prompt_ids == [] for r in recs)  # no tokenizer: the caller tokenizes
    assert isinstance(recs[0], PromptRecord)
    recs, _ = load_prompts(path, "q", None, "meta")
    assert all(r.label is None for r in recs)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"q": "x"', "bad JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
        ({"question": "x", "a": "1"}, "missing input key 'q'"),
        ({"q": "x", "a": "1", "meta": ["not", "a", "dict"]}, "metadata key 'meta' must be an object"),
        ({"q": "x", "a": "1", "meta": "str"}, "metadata key 'meta' must be an object"),
        ({"q": 5, "a": "1"}, "prompt must be a string"),
        ({"q": [{"content": "no role"}], "a": "1"}, "prompt must be a string"),
        ({"q": "x"}, "missing label key 'a'"),
        ({"q": "x", "a": {"x": 1}}, "label must be a string or a number"),
        ({"q": "x", "a": True}, "label must be a string or a number"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, reason):
    path = write(tmp_path, [{"q": "fine", "a": "1"}, bad, {"q": "also fine", "a": "2"}])
    with pytest.raises(DataError) as ei:
        load_prompts(path, "q", "a", "meta")
    msg = str(ei.value)
    assert msg.startswith(f"{path}:2: "), msg
    assert reason in msg, msg


def test_long_prompts_skipped_with_reason(tmp_path):
    path = write(tmp_path, [{"input": "hi"}, {"input": "hello world"}, {"input": "12345"}])
    tok = CharTokenizer()
    recs, skipped = load_prompts(path, tokenizer=tok, max_prompt_len=5)
    assert [r.line for r in recs] == [1, 3]
    assert recs[0].prompt_ids == [ord("h"), ord("i")]
    assert skipped == [(2, "prompt has 11 tokens > --rollout-max-prompt-len 5")]
    assert all(c[0] == "encode" and c[2] is False for c in tok.calls)  # add_special_tokens=False
    with pytest.raises(ValueError):
        load_prompts(path, max_prompt_len=5)  # cannot count tokens without a tokenizer


def test_chat_template(tmp_path):
    path = write(
        tmp_path, [{"input": "hi"}, {"input": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]
    )
    tok = CharTokenizer()
    recs, _ = load_prompts(path, tokenizer=tok, apply_chat_template=True)
    assert recs[0].prompt == "<user>hi<assistant>"  # a string prompt becomes one user message
    assert recs[1].prompt == "<system>s<user>u<assistant>"
    assert recs[0].prompt_ids == [ord(c) for c in "<user>hi<assistant>"]
    assert tok.calls[0] == ("template", [{"role": "user", "content": "hi"}], False, True)
    with pytest.raises(DataError, match=rf"{path}:2: .*apply-chat-template"):
        load_prompts(path, tokenizer=tok)  # a message list cannot be tokenized without the template
    with pytest.raises(ValueError):
        load_prompts(path, apply_chat_template=True)


def records(n):
    return [
        PromptRecord(prompt=f"p{i}", prompt_ids=[i, i + 100], label=str(i), metadata={"k": [i]}, line=i + 1)
        for i in range(n)
    ]


def test_group_stamping_and_fresh_copies():
    src = PromptSource(records(4), n_samples_per_prompt=3)
    assert len(src) == 4
    groups = [src.next_group() for _ in range(4)]
    assert all(len(g) == 3 for g in groups)
    assert [s.index for g in groups for s in g] == list(range(12))
    assert [g[0].group_index for g in groups] == [0, 1, 2, 3]
    assert all(len({s.group_index for s in g}) == 1 and len({s.group_id for s in g}) == 1 for g in groups)
    assert len({g[0].group_id for g in groups}) == 4
    g = groups[1]
    assert g[0].prompt == "p1" and g[0].tokens == [1, 101] and g[0].label == "1"
    assert g[0].metadata == {"k": [1], "line": 2}
    assert g[0].response_length == 0 and g[0].prompt_length == 2
    g[0].tokens.append(7)
    g[0].metadata["k"].append(9)
    assert g[1].tokens == [1, 101] and g[1].metadata["k"] == [1]  # each sample is its own copy
    assert src.records[1].prompt_ids == [1, 101] and src.records[1].metadata == {"k": [1]}


def test_epoch_wrap_and_max_epochs():
    src = PromptSource(records(3), n_samples_per_prompt=2, max_epochs=2)
    ids = []
    while (g := src.next_group()) is not None:
        ids.append(g[0].group_id)
    assert ids == ["e0-p0", "e0-p1", "e0-p2", "e1-p0", "e1-p1", "e1-p2"]
    assert src.next_group() is None and src.exhausted()
    assert src.sample_index == 12 and src.group_index == 6


def prompts(src, k):
    return [src.next_group()[0].prompt for _ in range(k)]


def test_shuffle_deterministic_by_seed_and_epoch():
    a = PromptSource(records(10), 1, rollout_shuffle=True, rollout_seed=3)
    b = PromptSource(records(10), 1, rollout_shuffle=True, rollout_seed=3)
    c = PromptSource(records(10), 1, rollout_shuffle=True, rollout_seed=4)
    pa, pb, pc = prompts(a, 20), prompts(b, 20), prompts(c, 20)
    assert pa == pb
    assert pa != pc
    assert sorted(pa[:10]) == sorted(pa[10:]) == sorted(f"p{i}" for i in range(10))  # each epoch a permutation
    assert pa[:10] != pa[10:]  # reshuffled with seed + epoch
    assert pa[:10] != [f"p{i}" for i in range(10)]
    assert prompts(PromptSource(records(10), 1), 10) == [f"p{i}" for i in range(10)]  # no shuffle: file order


def test_state_dict_resume_continues_with_the_same_groups():
    src = PromptSource(records(5), 2, rollout_shuffle=True, rollout_seed=7)
    for _ in range(7):  # into the second epoch
        src.next_group()
    state = msgspec.json.decode(msgspec.json.encode(src.state_dict()))  # survives serialisation
    resumed = PromptSource(records(5), 2, rollout_shuffle=True, rollout_seed=7)
    resumed.load_state_dict(state)
    for _ in range(6):  # across the next epoch boundary too
        assert msgspec.to_builtins(resumed.next_group()) == msgspec.to_builtins(src.next_group())
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSource(records(4), 2, rollout_shuffle=True, rollout_seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="rollout_seed"):
        PromptSource(records(5), 2, rollout_shuffle=True, rollout_seed=8).load_state_dict(state)


def test_from_args_and_empty(tmp_path):
    from streamrl.config import default_args

    path = write(tmp_path, [{"input": "a", "label": "x"}, {"input": "b", "label": "y"}])
    args = default_args(prompt_data=path, label_key="label", n_samples_per_prompt=4, num_epoch=1)
    src, skipped = PromptSource.from_args(args)
    assert skipped == [] and len(src) == 2
    assert [len(src.next_group()), len(src.next_group())] == [4, 4] and src.next_group() is None
    with pytest.raises(ValueError):
        PromptSource([], 2)
