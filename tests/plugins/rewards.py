"""Reward plug-ins used by the tests through `--custom-rm-path tests/plugins/rewards.py:<name>`."""


async def digit_fraction(args, sample) -> float:
    """Fraction of response characters that are digits: gives a random-init model a learnable signal."""
    text = sample.response
    return sum(c.isdigit() for c in text) / max(len(text), 1)


async def broken(args, sample) -> float:
    raise RuntimeError("this reward function always fails")


def blocking_sync(args, sample) -> float:
    """A synchronous reward that blocks (a slow grader): must run off the producers' event loop."""
    import time

    time.sleep(float(sample.metadata.get("sleep", 0.0)))
    return 1.0


async def bad_value(args, sample):
    """Returns what sample.metadata["value"] says: NaN, None, a string..."""
    return sample.metadata["value"]


async def flaky(args, sample) -> float:
    """The soak test's grader: by sample index, raises (1 in 37), hangs far past --rm-timeout (1 in 53), returns
    NaN (1 in 41); otherwise `digit_fraction`."""
    import asyncio

    i = sample.index or 0
    if i % 37 == 5:
        raise RuntimeError(f"grader crashed on sample {i}")
    if i % 53 == 7:
        await asyncio.sleep(3600)
    if i % 41 == 3:
        return float("nan")
    return await digit_fraction(args, sample)
