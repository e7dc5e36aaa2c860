"""Rollout plug-ins used by tests/test_rollout_plugins.py (slime signatures)."""

import anyio

from streamrl.rollout.generate import generate
from streamrl.types import Sample


async def fails_on_first_group(args, sample) -> float:
    if sample.group_index == 0:
        raise RuntimeError("grader crashed")
    return 1.0


async def hangs_on_second_group(args, sample) -> float:
    if sample.group_index == 1:
        await anyio.sleep(3600)
    return float(sample.index)


async def constant(args, sample) -> float:
    return 1.0


async def group_rank(args, samples) -> list[float]:
    return [float(i) for i, _ in enumerate(samples)]


async def tagged_generate(args, sample, sampling_params):
    """Per-sample generate function (via metadata["generate_function_path"])."""
    sample.metadata["generated_by"] = "tagged_generate"
    return await generate(args, sample, sampling_params)


class TwoGroups:
    """slime data source: two groups of text-only samples, then nothing."""

    def __init__(self, args):
        self.args, self.left = args, 2

    def get_samples(self, num_samples):
        out = []
        while self.left and len(out) < num_samples:
            self.left -= 1
            out.append([Sample(prompt="sort:312=", label="123",
                               metadata={"generate_function_path": "tests/plugins/rollout_plugins.py:tagged_generate"})
                        for _ in range(self.args.n_samples_per_prompt)])
        return out


async def label_length(args, sample) -> float:
    """The label's length: shows which key the label came from."""
    return float(len(sample.label or ""))
