"""Data sources for the producers: `--data-source-path` plug-ins, and the slime-style view handed to rollout functions.

    --data-source-path my_source.py:MySource      cls(args) with get_samples(num_samples) -> list[list[Sample]]
                                                   (slime's DataSource; add_samples/save/load are optional)

`PluginSource` turns such an object into the producers' `next_group()` interface: it stamps what slime's sources
do not (`group_id`, `index`) and tokenizes prompts that come without `tokens`. `RolloutDataSourceView` is the
`data_source` argument of `--rollout-function-path` functions: `get_samples(n)` / `add_samples(groups)` over the
producers' source, recording what was handed out and what came back so the ledger stays exact.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

from streamrl.data import PromptSource, load_prompts
from streamrl.plugins import load_function
from streamrl.types import Group, Sample


def make_source(a: argparse.Namespace, tokenizer: Any) -> tuple[Any, list]:
    """(source with `next_group()`, skipped prompts): a `--data-source-path` plug-in, else `--prompt-data`."""
    if a.data_source_path:

        return PluginSource(load_function(a.data_source_path, what="--data-source-path")(a), tokenizer, a), []

    records, skipped = load_prompts(a.prompt_data, a.input_key, a.label_key, a.metadata_key, tokenizer=tokenizer,
                                    apply_chat_template=a.apply_chat_template, max_prompt_len=a.rollout_max_prompt_len)
    if not records:
        raise ValueError(f"--prompt-data {a.prompt_data}: no usable prompts (skipped: {skipped[:3]})")
    return PromptSource(records, a.n_samples_per_prompt, rollout_shuffle=a.rollout_shuffle,
                        rollout_seed=a.rollout_seed, max_epochs=a.num_epoch), skipped


def tokenize_group(group: Group, tokenizer: Any, args: argparse.Namespace) -> None:
    """Fill `tokens` from `prompt` for samples that have none (slime's sources carry text only)."""
    for s in group:
        if s.tokens:
            continue
        prompt = s.prompt
        if args.apply_chat_template or not isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        s.tokens = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


class PluginSource:
    """`next_group()` over a slime data source object (`get_samples(1)`); None once it returns nothing."""

    def __init__(self, source: Any, tokenizer: Any, args: argparse.Namespace):
        if not hasattr(source, "get_samples"):
            raise TypeError(f"--data-source-path: {type(source).__name__} has no get_samples(num_samples) method")
        self.source, self.tokenizer, self.args = source, tokenizer, args
        self.groups_seen = 0
        self.samples_seen = 0

    def next_group(self) -> Group | None:
        got = self.source.get_samples(1)
        if not got:
            return None
        group = got[0]
        if isinstance(group, Sample):  # a flat list of samples: one group
            group = list(got)
        if len(group) != self.args.n_samples_per_prompt:
            raise ValueError(f"--data-source-path returned a group of {len(group)} samples; --n-samples-per-prompt "
                             f"is {self.args.n_samples_per_prompt}")
        gid = group[0].group_id or f"ds-{self.groups_seen}"
        for s in group:
            s.group_id = s.group_id or gid
            s.group_index = self.groups_seen if s.group_index is None else s.group_index
            if s.index is None:
                s.index = self.samples_seen
            self.samples_seen += 1
        self.groups_seen += 1
        tokenize_group(group, self.tokenizer, self.args)
        return group


class RolloutDataSourceView:
    """slime's `data_source` for rollout functions (`get_samples`, `add_samples`), thread-safe.

    `handed` lists groups taken by the function during the current call, `returned` those it gave back with
    `add_samples` (partial groups): they are handed out first by the next `get_samples`.
    """

    def __init__(self, next_group: Any):
        self._next_group = next_group
        self._lock = threading.Lock()
        self.pending: list[Group] = []  # given back by add_samples, handed out again first
        self.handed: list[Group] = []
        self.returned: list[Group] = []
        self.exhausted = False

    def get_samples(self, num_samples: int) -> list[Group]:
        with self._lock:
            out = self.pending[:num_samples]
            self.pending = self.pending[num_samples:]
            while len(out) < num_samples:
                g = self._next_group()
                if g is None:
                    self.exhausted = True
                    break
                out.append(g)
            self.handed.extend(out)
            return out

    def add_samples(self, groups: list[Group]) -> None:
        with self._lock:
            self.pending.extend(groups)
            self.returned.extend(groups)

    def take_call_record(self) -> tuple[list[Group], list[Group]]:
        """(handed out, given back) since the last call; resets both."""
        with self._lock:
            rec = (self.handed, self.returned)
            self.handed, self.returned = [], []
            return rec

    def __len__(self) -> int:
        return len(self.pending)
