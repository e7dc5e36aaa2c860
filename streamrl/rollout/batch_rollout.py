"""`--rollout-function-path`: slime's whole-rollout plug-in inside the streaming producers.

    def generate_rollout(args, rollout_id, data_source, evaluation=False)
        -> list[list[Sample]] | RolloutFnTrainOutput(samples=..., metrics=...)     (training)
        -> {name: {"rewards": [...], ...}} | RolloutFnEvalOutput(data=...)         (evaluation=True)

How it fits: a rollout function produces a whole rollout (`--rollout-batch-size` groups) at once, so it replaces
the per-group producers. The manager calls it (in a worker thread: slime's functions are synchronous and run their
own event loop) whenever the staleness pacing allows `rollout_batch_size` more groups, then scores the groups that
carry no reward and queues them. Training still streams: the trainer consumes these groups while the next rollout
is generated (one-step-off, like slime's train_async.py). `data_source` is a `RolloutDataSourceView` over the
producers' prompts; groups the function takes but neither returns nor gives back (`add_samples`) are recorded
`filtered` ("dropped by the rollout function") in the ledger. Plug-ins reach the engines with
`streamrl.rollout.generate.generate/post_generate` or `args.sglang_router_ip/port` (set when a router runs).
"""

from __future__ import annotations

from typing import Any

import anyio

from streamrl.rollout.sources import RolloutDataSourceView
from streamrl.types import Group, Sample, group_tokens
from streamrl.types import generated_tokens as generated


def train_groups(out: Any, group_size: int) -> list[Group]:
    """The groups of a training rollout output (list of groups, an object with `.samples`, or a flat list)."""
    samples = getattr(out, "samples", out)
    if samples is None:
        return []
    samples = list(samples)
    if samples and isinstance(samples[0], Sample):  # flat: consecutive runs of n samples
        return [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
    return [list(g) for g in samples]


def eval_results(out: Any) -> dict[str, dict[str, Any]]:
    """{name: {"rewards": [...], ...}} from an eval rollout output (a dict or an object with `.data`)."""
    data = getattr(out, "data", out)
    if not isinstance(data, dict):
        raise TypeError(f"an eval rollout function must return {{name: {{'rewards': [...]}}}}, got {type(out)}")
    return data


async def produce_rollouts(mgr: Any) -> None:
    """The producer loop of the manager when `--rollout-function-path` is set."""
    a = mgr.args
    view = RolloutDataSourceView(mgr.source.next_group)
    mgr.data_source_view = view
    mgr.partial_ids, mgr.ledger_known = set(), set()
    mgr.counted_tokens = {}  # gid -> generated tokens of a group given back (add_samples), already counted
    rollout_id = 0
    while not mgr.stopping:
        mgr.arm_wake()
        # groups given back earlier (add_samples) already hold their slot and are handed out first
        need = max(0, a.rollout_batch_size - len(mgr.partial_ids))
        if mgr.in_flight_room() < a.rollout_batch_size or await mgr.admission_room() < need:
            await mgr.wait_wake()
            continue
        mgr.in_flight += a.rollout_batch_size
        try:
            out = await anyio.to_thread.run_sync(mgr.rollout_fn, a, rollout_id, view, False)
        finally:
            mgr.in_flight -= a.rollout_batch_size
        handed, given_back = view.take_call_record()
        groups = train_groups(out, a.n_samples_per_prompt)
        await _account(mgr, handed, given_back, groups)
        rollout_id += 1
        for g in groups:
            if mgr.stopping:  # kept for a checkpoint/resume, as the streaming producers do
                mgr.partials.append(g)
                await mgr.buffer.mark.remote(g[0].group_id, "partial", "stopped")
                continue
            await mgr.finish_group(g)
        mgr.stats["rollouts"] += 1  # delivered: every group scored and queued (or kept as partial by a stop)
        if not groups and view.exhausted:
            mgr.exhausted = True
            return


async def _account(mgr: Any, handed: list[Group], given_back: list[Group], returned: list[Group]) -> None:
    """Keep the ledger exact: admit new groups, re-open resumed partials, mark given-back and dropped ones."""
    known = mgr.ledger_known
    back = {g[0].group_id for g in given_back}
    for gid, g in {g[0].group_id: g for g in handed + given_back + returned}.items():  # what the function generated
        now = generated(*group_tokens(g))
        mgr.stats["tokens_generated"] += now - mgr.counted_tokens.pop(gid, 0)
        if gid in back:
            mgr.counted_tokens[gid] = now
    new = [g[0].group_id for g in handed + returned if g[0].group_id not in known]
    new = list(dict.fromkeys(new))
    if new:
        await mgr.buffer.admit.remote(new)
        known.update(new)
    out_ids = {g[0].group_id for g in returned}
    back_ids = {g[0].group_id for g in given_back}
    for g in handed:  # resumed partials (from an earlier add_samples) are in flight again
        gid = g[0].group_id
        if gid not in new and gid in mgr.partial_ids:
            mgr.partial_ids.discard(gid)
            await mgr.buffer.mark.remote(gid, "in_flight", "resumed by the rollout function")
    for gid in back_ids - out_ids:
        mgr.partial_ids.add(gid)
        await mgr.buffer.mark.remote(gid, "partial", "returned with add_samples")
    for g in handed:
        gid = g[0].group_id
        if gid not in out_ids and gid not in back_ids:
            mgr.stats["groups_filtered"] += 1
            await mgr.buffer.mark.remote(gid, "filtered", "dropped by the rollout function", tokens=group_tokens(g))
