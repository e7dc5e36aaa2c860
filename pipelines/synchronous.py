"""The synchronous baseline: generate a batch, then train on it, then sync weights (no overlap).

It is the async loop with admission pacing at zero lag: `--max-staleness 0 --update-weights-interval 1` lets the
producers admit exactly one step's groups per version, so generation of step s+1 starts only after the weights of
step s are published. Engines and trainer therefore take turns; each may use every core during its turn
(set `--engine-torch-threads` and `--train-torch-threads` to the core count). Used by scripts/bench/async_vs_sync.py.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.async_loop import run as run_loop


def run(args: argparse.Namespace) -> dict[str, Any]:

    # a copy with zero lag: the caller's validated config is never changed
    sync_args = argparse.Namespace(**{**vars(args), "max_staleness": 0, "update_weights_interval": 1,
                                      "partial_rollout": False})
    return run_loop(sync_args, sync_mode=True)
