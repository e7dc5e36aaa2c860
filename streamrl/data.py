"""Prompt data: JSONL loading (`load_prompts`) and the group-stamping data source (`PromptSource`).

Follows slime's `RolloutDataSource` (`--prompt-data`, `--input-key`, `--label-key`, `--metadata-key`,
`--apply-chat-template`, `--rollout-max-prompt-len`, `--rollout-shuffle`, `--rollout-seed`), with two differences:
every malformed line is an error naming `file:line` (slime skips or crashes later), and prompts over
`--rollout-max-prompt-len` are returned in a `skipped` list with the reason instead of being dropped silently.

As in slime, with `--apply-chat-template` the record's `prompt` is the templated text (what slime plug-ins see in
`sample.prompt`); without it, it is the JSONL value (a string or a list of chat messages). No torch import here.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import msgspec

from streamrl.types import Sample


class DataError(ValueError):
    """A malformed prompt file; the message starts with `path:line:`."""


class PromptRecord(msgspec.Struct, kw_only=True):
    prompt: str | list[dict[str, Any]]
    prompt_ids: list[int] = msgspec.field(default_factory=list)  # [] when loaded without a tokenizer
    label: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    line: int = 0  # 1-based line number in the JSONL file


def _check_prompt(value: Any) -> str | None:
    """None when `value` is a valid prompt (a string or a list of {role, content} dicts), else the reason."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return None
    return f"prompt must be a string or a non-empty list of {{role, content}} messages, got {type(value).__name__}"


def _label(value: Any) -> str | None:
    """Labels are strings; JSON numbers are converted (e.g. GSM8K answers), anything else is an error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"label must be a string or a number, got {type(value).__name__}")


def load_prompts(
    path: str,
    input_key: str = "input",
    label_key: str | None = None,
    metadata_key: str = "metadata",
    tokenizer: Any = None,
    apply_chat_template: bool = False,
    max_prompt_len: int | None = None,
) -> tuple[list[PromptRecord], list[tuple[int, str]]]:
    """Read a JSONL prompt file into records; returns (records, skipped) with skipped = [(line_no, reason)].

    Each non-blank line must be a JSON object with `input_key` (a string or a chat message list); `label_key` (when
    set) must be present; `metadata_key` is optional but must be an object when present. Anything else raises
    `DataError("path:line: reason")`. With a tokenizer, the prompt is tokenized as
    `tokenizer(text, add_special_tokens=False)["input_ids"]`, where text is the prompt itself or, with
    `apply_chat_template`, `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`
    (a string prompt is wrapped as one user message). Prompts with more than `max_prompt_len` tokens go to `skipped`.
    """
    if (apply_chat_template or max_prompt_len is not None) and tokenizer is None:
        raise ValueError("apply_chat_template and max_prompt_len need a tokenizer")
    records: list[PromptRecord] = []
    skipped: list[tuple[int, str]] = []
    with open(path, "rb") as f:  # bytes, so that invalid UTF-8 is reported with its line
        for line_no, raw_bytes in enumerate(f, start=1):

            def fail(reason: str, line_no: int = line_no) -> DataError:
                return DataError(f"{path}:{line_no}: {reason}")

            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(f"invalid UTF-8 at byte {e.start} of the line: {raw_bytes[e.start:e.start + 4]!r}") from None
            if not raw.strip():
                continue

            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise fail(f"bad JSON: {e}") from None
            if not isinstance(obj, dict):
                raise fail(f"expected a JSON object, got {type(obj).__name__}")
            if input_key not in obj:
                raise fail(f"missing input key {input_key!r} (keys: {sorted(obj)})")
            prompt = obj[input_key]
            if (reason := _check_prompt(prompt)) is not None:
                raise fail(reason)
            label = None
            if label_key is not None:
                if label_key not in obj:
                    raise fail(f"missing label key {label_key!r}")
                try:
                    label = _label(obj[label_key])
                except TypeError as e:
                    raise fail(str(e)) from None
            metadata = obj.get(metadata_key)
            if metadata is None:
                metadata = {}
            elif not isinstance(metadata, dict):
                raise fail(f"metadata key {metadata_key!r} must be an object, got {type(metadata).__name__}")

            prompt_ids: list[int] = []
            if tokenizer is not None:
                if apply_chat_template:
                    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                elif not isinstance(prompt, str):
                    raise fail("prompt is a list of chat messages: set --apply-chat-template")
                prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
                    skipped.append(
                        (line_no, f"prompt has {len(prompt_ids)} tokens > --rollout-max-prompt-len {max_prompt_len}")
                    )
                    continue
            records.append(
                PromptRecord(prompt=prompt, prompt_ids=prompt_ids, label=label, metadata=metadata, line=line_no)
            )
    return records, skipped


class PromptSource:
    """Hands out prompt groups in epoch order: n fresh `Sample`s per prompt, stamped with ids.

    Each epoch visits every record once, in file order or (with `rollout_shuffle`) in a permutation drawn from
    `random.Random(rollout_seed + epoch)`, so the order is a pure function of (seed, epoch). `max_epochs=None`
    cycles forever; otherwise `next_group()` returns None after that many epochs. Stamps: `group_index` = running
    group counter, `index` = global monotonic sample counter, `group_id` = f"e{epoch}-p{position}" (position in the
    epoch's order: unique in a run and reproduced by a resume). `state_dict()` / `load_state_dict()` carry the
    cursor and counters so a resumed source yields the same next group.
    """

    def __init__(
        self,
        records: list[PromptRecord],
        n_samples_per_prompt: int,
        rollout_shuffle: bool = False,
        rollout_seed: int = 42,
        max_epochs: int | None = None,
    ):
        if not records:
            raise ValueError("no prompts: the prompt data is empty (or every prompt was skipped)")
        if n_samples_per_prompt < 1:
            raise ValueError(f"n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
        self.records = records
        self.n_samples_per_prompt = n_samples_per_prompt
        self.rollout_shuffle = rollout_shuffle
        self.rollout_seed = rollout_seed
        self.max_epochs = max_epochs
        self.epoch = 0
        self.offset = 0  # position of the next prompt in this epoch's order
        self.group_index = 0  # next group_index to stamp
        self.sample_index = 0  # next sample index to stamp
        self._order_epoch: int | None = None
        self._order: list[int] = []

    @classmethod
    def from_args(cls, args: Any, tokenizer: Any = None) -> tuple[PromptSource, list[tuple[int, str]]]:
        """Build from parsed flags (`--prompt-data` etc., `--num-epoch` as max_epochs); returns (source, skipped)."""
        if not args.prompt_data:
            raise ValueError("--prompt-data is required")
        records, skipped = load_prompts(
            args.prompt_data,
            args.input_key,
            args.label_key,
            args.metadata_key,
            tokenizer=tokenizer,
            apply_chat_template=args.apply_chat_template,
            max_prompt_len=args.rollout_max_prompt_len,
        )
        source = cls(
            records,
            args.n_samples_per_prompt,
            rollout_shuffle=args.rollout_shuffle,
            rollout_seed=args.rollout_seed,
            max_epochs=args.num_epoch,
        )
        return source, skipped

    def __len__(self) -> int:
        return len(self.records)

    def epoch_order(self, epoch: int) -> list[int]:
        """Record indices in the order epoch `epoch` visits them."""
        order = list(range(len(self.records)))
        if self.rollout_shuffle:
            random.Random(self.rollout_seed + epoch).shuffle(order)
        return order

    def _record_at(self, epoch: int, offset: int) -> PromptRecord:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        return self.records[self._order[offset]]

    def exhausted(self) -> bool:
        return self.max_epochs is not None and self.epoch >= self.max_epochs

    def next_group(self) -> list[Sample] | None:
        """The n samples of the next prompt (fresh deep copies), or None once `max_epochs` epochs are done."""
        if self.offset >= len(self.records):
            self.epoch, self.offset = self.epoch + 1, 0
        if self.exhausted():
            return None
        rec = self._record_at(self.epoch, self.offset)
        group_id = f"e{self.epoch}-p{self.offset}"
        group = []
        for _ in range(self.n_samples_per_prompt):
            group.append(
                Sample(
                    group_index=self.group_index,
                    index=self.sample_index,
                    group_id=group_id,
                    prompt=copy.deepcopy(rec.prompt),
                    tokens=list(rec.prompt_ids),
                    label=rec.label,
                    metadata={**copy.deepcopy(rec.metadata), "line": rec.line},
                )
            )
            self.sample_index += 1
        self.group_index += 1
        self.offset += 1
        return group

    def state_dict(self) -> dict[str, Any]:
        """Plain-data cursor: enough (with the same records and flags) to continue with the same next group."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "group_index": self.group_index,
            "sample_index": self.sample_index,
            "num_prompts": len(self.records),
            "rollout_shuffle": self.rollout_shuffle,
            "rollout_seed": self.rollout_seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; refuses a state saved over different data or a different shuffle order."""
        for key, mine in (
            ("num_prompts", len(self.records)),
            ("rollout_shuffle", self.rollout_shuffle),
            ("rollout_seed", self.rollout_seed),
        ):
            if key in state and state[key] != mine:
                raise ValueError(f"data source state has {key}={state[key]!r}, this source has {mine!r}")
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.group_index = int(state["group_index"])
        self.sample_index = int(state["sample_index"])
