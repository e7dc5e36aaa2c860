"""A long-tailed response-length job for benchmarks.

    --custom-generate-function-path scripts/bench/long_tail.py:generate

A random-init model never emits EOS, so every response would run to `--rollout-max-response-len`. RL rollouts of a
real policy do not: most answers are short and a few run long (reasoning traces), and in a synchronous step the
whole batch waits for those few. This generate function gives every sample a length drawn once from a log-normal
(median `MEDIAN` tokens, log-sd `SIGMA`, clipped to [`FLOOR`, --rollout-max-response-len]), decided by the sample's
global index so every pipeline sees the same lengths, and stops it there as an EOS would. It resumes partial
rollouts like the default generate (the target counts the tokens already generated).

Signature (slime's): `async generate(args, sample, sampling_params) -> Sample`.
"""

from __future__ import annotations

import math
import random
from typing import Any

from streamrl.rollout.generate import generate as default_generate
from streamrl.types import Sample, Status

MEDIAN, SIGMA, FLOOR = 96, 0.9, 16


def target_length(index: int, cap: int) -> int:
    """The response length of sample `index` (deterministic), at most `cap`."""
    z = random.Random(index * 7919 + 17).gauss(0.0, 1.0)
    return int(min(cap, max(FLOOR, MEDIAN * math.exp(SIGMA * z))))


async def generate(args: Any, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    target = target_length(sample.index or 0, args.rollout_max_response_len)
    left = target - sample.response_length
    if left <= 0:
        sample.status = Status.COMPLETED
        return sample
    await default_generate(args, sample, {**sampling_params, "max_new_tokens": min(sampling_params["max_new_tokens"],
                                                                                     left)})
    if sample.status == Status.TRUNCATED and sample.response_length >= target:
        sample.status = Status.COMPLETED  # stopped at its length, as an EOS would
    return sample
