"""Synthetic tasks: sort or reverse a short digit string, add two numbers.

Each example is a JSONL record `{"input": prompt, "label": answer, "metadata": {"rm_type": task}}`. The reward is
exact match of the response (special tokens stripped) with the label, or with
`--custom-rm-path streamrl.tasks.synthetic:partial_credit_rm` the fraction of positions right (a denser reward
shape, used as the second task of scripts/bench/staleness_sweep.py). For SFT warm-up data, `noise` replaces a
fraction of the answers with a near miss (two positions swapped or one digit changed): the model then learns the
format and roughly `1 - noise` of the skill, and RL has something left to learn.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def _sort(rng: random.Random, length: int) -> tuple[str, str]:
    s = _digits(rng, length, length)
    return f"sort:{s}=", "".join(sorted(s))


def _reverse(rng: random.Random, length: int) -> tuple[str, str]:
    s = _digits(rng, length, length)
    return f"rev:{s}=", s[::-1]


def _add(rng: random.Random, length: int) -> tuple[str, str]:
    a, b = rng.randint(0, 10**length - 1), rng.randint(0, 10**length - 1)
    return f"{a}+{b}=", str(a + b)


TASKS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {"sort": _sort, "reverse": _reverse, "add": _add}


def make_example(task: str, rng: random.Random, length: int = 4) -> dict:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    prompt, label = TASKS[task](rng, length)
    return {"input": prompt, "label": label, "metadata": {"rm_type": task}}


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same length: two positions swapped if that changes it, else one digit changed."""
    chars = list(answer)
    if len(chars) > 1:
        i, j = rng.sample(range(len(chars)), 2)
        if chars[i] != chars[j]:
            chars[i], chars[j] = chars[j], chars[i]
            return "".join(chars)
    i = rng.randrange(len(chars))
    chars[i] = rng.choice([d for d in "0123456789" if d != chars[i]])
    return "".join(chars)


def write_task_jsonl(path: str | Path, task: str, n: int, seed: int, length: int = 4, noise: float = 0.0) -> Path:
    """Write `n` examples; with `noise`, that fraction of labels are near misses (SFT warm-up data only)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            ex = make_example(task, rng, length)
            if noise and rng.random() < noise:
                ex["label"] = near_miss(ex["label"], rng)
            f.write(json.dumps(ex) + "\n")
    return path


def exact_match_reward(response: str, label: str | None) -> float:
    """1.0 when the response (whitespace-stripped) equals the label, else 0.0.

    >>> exact_match_reward(" 1349", "1349")
    1.0
    >>> exact_match_reward("1394", "1349")
    0.0
    """
    return float(label is not None and response.strip() == str(label).strip())


def digit_match_reward(response: str, label: str | None) -> float:
    """Partial credit: positions where the response matches the label, over the longer of the two lengths.

    >>> digit_match_reward("1349", "1349")
    1.0
    >>> digit_match_reward("1394", "1349")
    0.5
    >>> digit_match_reward("13", "1349")
    0.5
    """
    if label is None:
        return 0.0
    r, lab = response.strip(), str(label).strip()
    if not r and not lab:
        return 1.0
    return sum(a == b for a, b in zip(r, lab, strict=False)) / max(len(r), len(lab))


async def partial_credit_rm(args, sample) -> float:
    """`--custom-rm-path streamrl.tasks.synthetic:partial_credit_rm`: `digit_match_reward` of the sample."""
    return digit_match_reward(sample.response, sample.label)
