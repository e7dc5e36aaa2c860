"""Reward plug-ins used by the tests through `--custom-rm-path tests/plugins/rewards.py:<name>`."""


async def digit_fraction(args, sample) -> float:
    """Fraction of response characters that are digits: gives a random-init model a learnable signal."""
    text = sample.response
    return sum(c.isdigit() for c in text) / max(len(text), 1)


async def broken(args, sample) -> float:
    raise RuntimeError("this reward function always fails")
