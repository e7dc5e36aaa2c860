"""Shared builders for the buffer tests (not a test module)."""

from __future__ import annotations

import types

from streamrl.types import Sample


def group(gid: str, version: int | list[int] = 0, n: int = 2, rewards: list[float] | None = None,
          prompt: int = 3, response: int = 2) -> list[Sample]:
    """A finished group whose samples were generated at `version` (one per sample if a list)."""
    out = []
    for i in range(n):
        v = version[i] if isinstance(version, list) else version
        s = Sample(group_id=gid, index=i, prompt="p", tokens=list(range(1, prompt + 1)))
        s.append_response_tokens(tokens=[7 + j for j in range(response)], log_probs=[-0.5] * response, version=v,
                                 finish_reason="stop")
        s.reward = None if rewards is None else rewards[i]
        out.append(s)
    return out


def ids(groups) -> list[str]:
    return [g[0].group_id for g in groups]


def make_args(**kw):
    d = dict(async_buffer_size=4, max_staleness=1, stale_policy="drop", buffer_filter_path=None,
             n_samples_per_prompt=2, update_weights_interval=1, global_batch_size=None, rollout_batch_size=8,
             num_steps_per_rollout=1, seed=1234, buffer_priority="reward_std", reward_key=None,
             async_buffer_max_tokens=None, max_reuse=1)
    d.update(kw)
    return types.SimpleNamespace(**d)
