"""What the driver watches besides training: pipeline health per step, engine counters, the token balance at the
end, and a watchdog that says what is stuck when the trainer waits too long for a batch."""

from __future__ import annotations

from typing import Any

import ray

from buffers.tokens import balance
from streamrl.sync.base import http_client
from streamrl.wire import decode_batch


def pipeline_health(bstats: dict[str, Any], prod_ref: Any) -> dict[str, Any]:
    """Per-step pacing and token figures: look-ahead (outstanding groups) against the pacing bound, admission
    room left, tokens wasted (settled as discarded) and, when the producers answered in time, generated."""
    slots = bstats["slots"]
    out = {"lookahead": slots["outstanding"], "pacing_used": slots["used"], "pacing_limit": slots["limit"],
           "pacing_room": slots["room"], "tokens_trained": bstats["tokens_trained"],
           "tokens_wasted": bstats["tokens_wasted"]}
    if ray.wait([prod_ref], timeout=0)[0]:
        st = ray.get(prod_ref)
        out.update(tokens_generated=st["tokens_generated"], groups_in_flight=st["in_flight"])
    return out


def token_balance(c: Any) -> dict[str, Any]:
    """The token ledger at the end of a run (producers stopped): generated = trained + discarded + carried."""
    settled = ray.get(c.buffer.token_ledger.remote())
    prod = ray.get(c.manager.token_state.remote())
    carried = {**settled.pop("carried"), "in_flight": prod["in_flight"], "partial_stopped": prod["partial_stopped"]}
    return balance(prod["generated"], settled, carried)


def get_batch(c: Any, b: int, step: int, watchdog_s: float | None, poll_s: float = 5.0) -> list:
    """buffer.get, checking every `poll_s` that the producers are alive, can still deliver, and make progress:
    with no group settled and no token generated for `watchdog_s` while the trainer waits, the job stops and
    says what is stuck."""
    while True:
        try:  # msgpack bytes from the buffer, decoded here (the trainer's side pays the decode, nobody else)
            return decode_batch(ray.get(c.buffer.get_encoded.remote(b, step, timeout=poll_s)))
        except TimeoutError:
            try:
                st = ray.get(c.manager.get_stats.remote(), timeout=60)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError("the rollout producers did not answer for 60 s: their event loop is blocked "
                                   "(a synchronous plug-in that never returns?)") from None
            if st["fatal"]:
                raise RuntimeError(f"rollout producers crashed:\n{st['fatal']}") from None
            if st["exhausted"] and st["in_flight"] == 0 and ray.get(c.buffer.size.remote()) < b:
                raise RuntimeError(f"prompt data exhausted before step {step + 1} (--num-epoch too small?)") from None
            if watchdog_s and st["last_progress_age_s"] > watchdog_s:
                raise RuntimeError(stuck_message(st, ray.get(c.buffer.stats.remote()), step, watchdog_s)) from None


def stuck_message(st: dict[str, Any], bstats: dict[str, Any], step: int, watchdog_s: float) -> str:
    """One line naming what holds a job that made no rollout progress for `watchdog_s` seconds."""
    old, slots = st["oldest_in_flight"], bstats["slots"]
    where = (f"{st['in_flight']} groups in flight, the oldest ({old['group']}) {old['stage']} for "
             f"{old['age_s']:.0f} s" if old else "no group in flight")
    if not old and slots["room"] == 0:
        where += (f"; admission pacing allows no new group ({slots['used']} slots used of {slots['limit']}, "
                  f"{bstats['size']} queued)")
    errors = f"; last errors: {st['errors'][-2:]}" if st["errors"] else ""
    return (f"no rollout progress for {st['last_progress_age_s']:.0f} s (--rollout-watchdog-timeout {watchdog_s:g}) "
            f"while the trainer waits for step {step + 1}: {where}{errors}")


def engine_counters(urls: list[str]) -> dict[str, float]:
    """Cumulative counters of the embedded engines, summed: `engine_busy_time` (seconds in forward steps; engine
    idle = 1 - d(busy) / d(wall) / engine_count) and `engine_<k>` for the iteration stats (rows, iterations, time
    per phase).
    Empty for engines that do not report them (SGLang)."""
    total: dict[str, float] = {}
    for u in urls:
        try:
            state = http_client().get(u + "/server_info", timeout=5).json()["internal_states"][0]
            counters = {"busy_time": state["busy_time"], **state.get("step_stats", {})}
        except Exception:  # not the embedded engine, or it is busy answering: no figure this step
            return {}
        for k, v in counters.items():
            total[f"engine_{k}"] = total.get(f"engine_{k}", 0.0) + float(v)
    if total:
        total["engine_count"] = len(urls)
    return total


def weight_diff(c: Any) -> float:
    """Largest |engine - trainer| over every parameter of every engine (0.0 means the sync is exact)."""
    trainer = dict(c.trainer.full_named_parameters())
    engines = ray.get([e.get_state_dict.remote() for e in c.engines])
    return max([0.0, *(max_weight_diff(trainer, sd) for sd in engines)])


def max_weight_diff(trainer: dict[str, Any], engine: dict[str, Any]) -> float:
    """Largest |engine - trainer| in the engine's dtype: the trainer's fp32 master weights are first rounded as the
    sync rounds them for a bf16 engine (the GPU default), so 0.0 still means bit-exact in what the engine holds."""
    missing = set(trainer) - set(engine)
    if missing:
        raise RuntimeError(f"engine lacks trainer parameters {sorted(missing)[:3]}")
    return max([0.0, *((trainer[k].to(engine[k].dtype) - engine[k]).abs().max().item() for k in trainer)])
