"""RolloutManager: the producers (a Ray async actor). Keeps groups in flight, generates, scores, puts groups.

    data source ──> admit (in flight < cap, buffer.admission_room() > 0) ──> one task per group
    group task:  generate (batched /generate per group, or per sample: custom function / streaming) ... abort ->
                 partial: resubmit prompt+prefix ... reward ... dynamic filter ... buffer.put([group])

A group goes to the buffer as soon as its own samples are scored, never waiting for a batch. Every group taken
from the data source is admitted in the buffer's ledger and ends in exactly one state: queued, partial (stopped),
failed (engine error, or a reward that raised / timed out: those samples are FAILED with `reward_error` in their
metadata), or filtered (dynamic sampling, with the filter's reason). Admission pacing has one owner, the buffer's
ledger (buffers/admission.py): failed, filtered and stale-dropped groups give their slot back there, regenerated
and resumed groups keep theirs, so filtering over-samples continuously instead of stalling the pacing bound and a
long job stays exactly as far ahead as it started. Tokens: `stats["tokens_generated"]` counts what generation
calls added to samples; the buffer settles each group's tokens when it ends (buffers/tokens.py).

With `--rollout-function-path` the producers instead call slime's `generate_rollout(args, rollout_id,
data_source)` once per rollout (`rollout_batch_size` groups), in a worker thread, whenever pacing allows a whole
rollout; its groups are scored if they carry no reward and queued (`batch_rollout.py`).

Requests: `/generate` goes to the router when there is one, else to the least busy engine; abort goes to every
engine (routers do not proxy it).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import time
import traceback
from typing import Any

import anyio
from transformers import AutoTokenizer

from streamrl.plugins import load_function
from streamrl.rollout.batch_rollout import produce_rollouts
from streamrl.rollout.client import EngineClient, EngineError
from streamrl.rollout.dynamic_filters import call_dynamic_filter, load_dynamic_filter, load_sample_filter
from streamrl.rollout.evaluation import Evaluator
from streamrl.rollout.generate import generate, generate_group, generate_streaming, register_client, set_endpoints
from streamrl.rollout.rewards import load_group_reward_fn, load_reward_fn, score_group
from streamrl.rollout.sources import make_source
from streamrl.types import Group, Sample, Status, group_tokens
from streamrl.types import generated_tokens as generated
from streamrl.wire import encode_batch

logger = logging.getLogger("streamrl.rollout")


class RolloutManager:
    def __init__(self, args: argparse.Namespace, buffer: Any, engine_urls: list[str], router_url: str | None = None):
        self.args, self.buffer = args, buffer
        n_targets = max(1, len(engine_urls))
        self.client = EngineClient(engine_urls, router_url=router_url,
                                   max_connections=args.sglang_server_concurrency * n_targets,
                                   health_check_interval=args.rollout_health_check_interval,
                                   health_check_timeout=args.rollout_health_check_timeout)
        set_endpoints(engine_urls, router_url)
        self.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)

        self.source, self.skipped = make_source(args, self.tokenizer)
        self.reward_fn = None if args.group_rm else load_reward_fn(args)
        self.group_reward_fn = load_group_reward_fn(args) if args.group_rm else None
        self.dynamic_filter = load_dynamic_filter(args.dynamic_sampling_filter_path)
        self.sample_filter = load_sample_filter(args.rollout_sample_filter_path)
        self.generate_fn = None
        if args.custom_generate_function_path:
            self.generate_fn = load_function(args.custom_generate_function_path, what="--custom-generate-function-path")
        self.rollout_fn = None
        if args.rollout_function_path:
            self.rollout_fn = load_function(args.rollout_function_path, what="--rollout-function-path")
        self._sample_fns: dict[str, Any] = {}  # per-sample metadata["generate_function_path"], loaded once
        self.version = 0
        self.in_flight = 0
        self.stopping = False
        self.exhausted = False
        self.partials: list[Group] = []  # groups cut off by stop(), kept for a checkpoint/resume
        self._live: dict[str, Group] = {}  # groups in flight, by id (a checkpoint copies them)
        self._stage: dict[str, tuple[str, float]] = {}  # group id -> (what it waits for, since when): the watchdog
        self._last_progress = time.monotonic()  # a group settled or tokens arrived
        self._admit_lock = asyncio.Lock()  # held from taking groups to starting them: checkpoints wait for it
        self._paused = False  # admission paused by a checkpoint
        self._resume_partials = False  # a restored checkpoint stashed groups in the buffer: take those first
        self.failed: list[Group] = []  # the last groups that failed (samples carry their errors), for inspection
        self.stats: dict[str, Any] = {
            "groups_done": 0, "groups_failed": 0, "samples_done": 0, "tokens_generated": 0, "partial_resumes": 0,
            "aborted_regenerated": 0, "regenerated_groups": 0, "reward_failures": 0,
            "groups_filtered": 0, "filter_reasons": {}, "rollouts": 0, "failed_samples_masked": 0}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._errors: list[str] = []
        self.evaluator = Evaluator(self)
        self.fatal: str | None = None

    # --- control (called by the driver) ---------------------------------------------------------------------
    async def start(self) -> None:
        register_client(self.client)
        self._task = asyncio.get_running_loop().create_task(self._produce())

    async def set_version(self, version: int) -> None:
        self.version = max(self.version, version)  # the driver does not wait for the answer: never go back
        self._wake.set()

    async def add_engine(self, url: str) -> None:
        """A new engine for abort/pause fan-out (and for /generate when there is no router)."""
        self.client.add_worker(url)

    async def remove_engine(self, url: str) -> None:
        self.client.remove_worker(url)

    async def get_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        oldest = min(self._stage.items(), key=lambda kv: kv[1][1], default=None)
        return {**self.stats, "filter_reasons": dict(self.stats["filter_reasons"]), "in_flight": self.in_flight,
                "version": self.version, "exhausted": self.exhausted, "fatal": self.fatal,
                "errors": list(self._errors[-5:]), "skipped_prompts": len(self.skipped),
                "last_progress_age_s": now - self._last_progress,
                "oldest_in_flight": None if oldest is None else
                {"group": oldest[0], "stage": oldest[1][0], "age_s": now - oldest[1][1]}}

    async def token_state(self) -> dict[str, int]:
        """Tokens generated so far, and the generated tokens of the groups the producers hold (in flight, and
        cut off by a stop): with the buffer's `token_ledger()` they must add up (buffers/tokens.py)."""
        return {"generated": self.stats["tokens_generated"],
                "in_flight": sum(generated(*group_tokens(g)) for g in self._live.values()),
                "partial_stopped": sum(generated(*group_tokens(g)) for g in self.partials)}

    async def get_failed(self, n: int = 8) -> list[Group]:
        """The last `n` failed groups (FAILED samples carry `metadata["reward_error"]`)."""
        return self.failed[-n:]

    async def stop(self, grace_s: float = 10.0) -> dict[str, Any]:
        """Stop admitting, abort in-flight requests and wait for every group task to settle. Groups still busy
        after `grace_s` (a reward that hangs) are cancelled and kept as partial, to be scored after a resume."""
        self.stopping = True
        self._wake.set()
        await self.client.abort()
        if self._task is not None:
            with anyio.move_on_after(grace_s):
                await asyncio.shield(self._task)
            if not self._task.done():
                logger.warning("stop: %d groups still busy after %.0fs (oldest: %s); cancelled, kept as partial",
                               self.in_flight, grace_s, (await self.get_stats())["oldest_in_flight"])
                self._task.cancel()
                with anyio.fail_after(60):
                    await asyncio.wait([self._task])
        return await self.get_stats()

    async def close(self) -> None:
        await self.client.aclose()

    # --- checkpoints (pipelines/checkpoint.py) ---------------------------------------------------------------
    async def checkpoint_state(self) -> dict[str, Any]:
        """Pause admission and return the source cursor, copies of the in-flight groups with their responses
        reset (generation goes on) and the groups cut off by stop(). Call `resume_admission` afterwards."""

        async with self._admit_lock:
            self._paused = True
            live = copy.deepcopy(list(self._live.values()))
        for g in live:
            for smp in g:
                smp.reset_response("checkpoint_resume")
        state = getattr(self.source, "state_dict", None)
        return {"source": state() if callable(state) else None, "live": live, "partials": list(self.partials)}

    async def resume_admission(self) -> None:
        self._paused = False
        self._wake.set()

    async def restore(self, source_state: dict[str, Any] | None, stashed: bool, tokens_generated: int) -> None:
        """Continue from a checkpoint (before `start`): data cursor, whether the buffer holds stashed groups
        (partials, groups to regenerate) that the producers take before new prompts, and the token count that the
        restored groups account for (the buffer's settled + carried tokens)."""
        if source_state is not None:
            self.source.load_state_dict(source_state)
        self._resume_partials = stashed
        self.stats["tokens_generated"] = int(tokens_generated)

    # --- the producer loop ----------------------------------------------------------------------------------
    async def _produce(self) -> None:
        try:
            if self.rollout_fn is not None:

                await produce_rollouts(self)
            else:
                await self._produce_loop()
        except BaseException as e:  # surfaced to the driver through get_stats()["fatal"]

            if not (self.stopping and isinstance(e, asyncio.CancelledError)):  # a cancel by stop() is no crash
                self.fatal = traceback.format_exc()
            raise

    def in_flight_room(self) -> int:
        """How many groups may start now under the in-flight cap (0 while a checkpoint pauses admission)."""
        return 0 if self._paused else max(0, self.args.rollout_max_groups_in_flight - self.in_flight)

    async def admission_room(self) -> int:
        """New groups the staleness pacing allows now (owned by the buffer's ledger)."""
        return await self.buffer.admission_room.remote(self.version)

    def arm_wake(self) -> None:
        """Start a round of admission checks: a wake-up from now on (a version, a settled group) ends the next
        `wait_wake`, even one that lands during the checks' own awaits."""
        self._wake.clear()

    async def wait_wake(self) -> None:
        """Wait for a wake-up since `arm_wake`, or 0.5 s."""
        with anyio.move_on_after(0.5):
            await self._wake.wait()

    async def _produce_loop(self) -> None:
        last_regen_check = 0.0
        async with anyio.create_task_group() as tg:
            while not self.stopping:
                self.arm_wake()
                started = 0
                async with self._admit_lock:  # a checkpoint waits for it, then pauses admission (cap 0)
                    cap = self.in_flight_room()
                    groups: list[Group] = []
                    if cap and self._resume_partials:  # stashed by a restored checkpoint: before new prompts
                        groups = await self.buffer.take_partials.remote(cap)
                        self._resume_partials = len(groups) == cap
                    if cap > len(groups) and time.monotonic() - last_regen_check > 0.5:  # sent back as stale
                        last_regen_check = time.monotonic()
                        regen = await self.buffer.take_regenerate.remote(cap - len(groups))
                        self.stats["regenerated_groups"] += len(regen)
                        groups += regen
                    # Resumed groups already hold their slot; new ones need room under the pacing bound.
                    n_new = min(cap - len(groups), await self.admission_room()) if cap > len(groups) else 0
                    new = [] if self.exhausted else [
                        g for g in (self.source.next_group() for _ in range(n_new)) if g is not None]
                    if len(new) < n_new:
                        self.exhausted = True  # groups in flight may still be sent back stale: keep serving
                    if new:  # one ledger call for the whole batch of admissions
                        await self.buffer.admit.remote([g[0].group_id for g in new])
                    for group in groups + new:
                        self.in_flight += 1
                        self._live[group[0].group_id] = group
                        tg.start_soon(self._run_group, group)
                    started = len(groups) + len(new)
                if not started:
                    if self.exhausted and self.in_flight == 0:
                        break  # the data is used up and every group settled
                    await self.wait_wake()

    async def _run_group(self, group: Group) -> None:
        gid = group[0].group_id
        self._stage[gid] = ("generating", time.monotonic())
        try:
            await self._settle(group)
        except asyncio.CancelledError:  # stop() gave up waiting (a hung reward): keep it to resume, then unwind
            with anyio.CancelScope(shield=True):
                if await self.buffer.state_of.remote(gid) == "in_flight":
                    self.partials.append(group)
                    await self.buffer.mark.remote(gid, "partial", f"cancelled at stop while {self._stage[gid][0]}")
            raise
        finally:
            self._live.pop(gid, None)
            self._stage.pop(gid, None)
            self.in_flight -= 1
            self._last_progress = time.monotonic()
            self._wake.set()

    async def _settle(self, group: Group) -> None:
        gid = group[0].group_id
        try:
            await self._generate_group(group)
            if self.stopping and any(s.status in (Status.PENDING, Status.ABORTED) for s in group):
                self.partials.append(group)
                await self.buffer.mark.remote(gid, "partial", "stopped")
                return
            self._stage[gid] = ("scoring", time.monotonic())
            await self.finish_group(group)
        except* EngineError as eg:
            await self._drop(group, "failed", "; ".join(str(e) for e in eg.exceptions)[:500])

    async def finish_group(self, group: Group) -> bool:
        """Decode, score, filter and queue a generated group; True if it reached the buffer."""

        for s in group:
            s.response = self.tokenizer.decode(s.tokens[s.prompt_length:],
                                               skip_special_tokens=self.args.rollout_skip_special_tokens)
        errors = await score_group(self.args, group, self.reward_fn, self.group_reward_fn)
        if errors:  # counted, logged and kept in the ledger; never silently dropped, never fatal
            failed = [s for s in group if s.status == Status.FAILED]
            self.stats["reward_failures"] += len(failed)
            logger.warning("reward failed in group %s: %s", group[0].group_id, "; ".join(errors)[:500])
            if len(failed) == len(group):
                await self._drop(group, "failed", "reward: " + "; ".join(errors)[:480])
                return False
            # Only the bad samples go: dropping the group would lose 1 - (1 - p)^n of the groups for a fraction p
            # of bad samples (a third at p = 5%, n = 8). They stay in the group as empty, masked samples that the
            # advantage leaves out of the group's baseline (train/batch.py), and their tokens count as discarded.
            for s in failed:
                s.reset_response("failed_sample")
                s.status, s.remove_sample = Status.FAILED, True
            self.stats["failed_samples_masked"] += len(failed)
        if self.dynamic_filter is not None:
            keep, reason = await call_dynamic_filter(self.dynamic_filter, self.args, group)
            if not keep:
                reasons = self.stats["filter_reasons"]
                reasons[reason] = reasons.get(reason, 0) + 1
                await self._drop(group, "filtered", reason)
                return False
        if self.sample_filter is not None:  # marks samples remove_sample=True (left out of the loss)
            self.sample_filter(self.args, [group])
        self.stats["groups_done"] += 1
        self.stats["samples_done"] += len(group)
        if group[0].group_id in self._stage:
            self._stage[group[0].group_id] = ("queueing (buffer full)", time.monotonic())
        if not await self._queue(group):
            self.partials.append(group)
            await self.buffer.mark.remote(group[0].group_id, "partial", "stopped before queued")
            return False
        return True

    async def _drop(self, group: Group, state: str, reason: str) -> None:
        """Record a group that will not be trained (failed / filtered): the buffer's ledger gives its admission
        slot back and settles its tokens as discarded under `state`."""
        self.stats["groups_failed" if state == "failed" else "groups_filtered"] += 1
        if state == "failed":
            self._errors.append(reason)
            self.failed = (self.failed + [group])[-32:]
        await self.buffer.mark.remote(group[0].group_id, state, reason, tokens=group_tokens(group))

    async def _queue(self, group: Group) -> bool:
        """Put a finished group, waiting while the buffer is full; False if the job stopped meanwhile. It travels
        as msgpack bytes with its metadata beside them, which the buffer never decodes on the way (10x the
        samples/s of pickled Samples, scripts/bench/queue_throughput.py)."""
        data = encode_batch([group])
        while True:
            try:
                await self.buffer.put_encoded.remote(data, timeout=1.0)
                return True
            except TimeoutError:
                if self.stopping:
                    return False

    def _prepare(self, s: Sample) -> int:
        """Bookkeeping before a (re)submission; returns the remaining token budget (0: nothing to generate)."""
        a = self.args
        remaining = a.rollout_max_response_len - s.response_length
        if a.rollout_max_context_len is not None:  # prompt + response within the context (slime)
            remaining = min(remaining, a.rollout_max_context_len - len(s.tokens))
        if remaining <= 0:
            s.status = Status.TRUNCATED
            return 0
        if s.status == Status.ABORTED:
            if a.partial_rollout:
                self.stats["partial_resumes"] += 1
                if a.mask_offpolicy_in_partial_rollout:
                    s.loss_mask = [0] * s.response_length
            else:  # without --partial-rollout an interrupted generation starts over (counted as waste)
                self.stats["aborted_regenerated"] += 1
                s.reset_response("abort_restart")  # the token ledger counts them (discarded: abort_restart)
                remaining = a.rollout_max_response_len
        return remaining

    def sample_fn(self, s: Sample) -> Any:
        """The per-sample generate function for `s`, or None for the batched built-in."""
        path = s.metadata.get("generate_function_path")
        if path:
            if path not in self._sample_fns:

                self._sample_fns[path] = load_function(path, what=f"sample {s.index} generate_function_path")
            return self._sample_fns[path]
        if self.generate_fn is not None:
            return self.generate_fn
        if self.args.rollout_stream:
            return lambda a, sample, params: generate_streaming(a, sample, params, client=self.client)
        return None

    async def _generate_group(self, group: Group) -> None:
        """Generate every unfinished sample: one batched /generate per round for built-in samples, the per-sample
        contract `async generate(args, sample, params)` for the others; aborted samples go round again."""
        while True:
            todo = [s for s in group if s.status in (Status.PENDING, Status.ABORTED)]
            if not todo or (self.stopping and any(s.status == Status.ABORTED for s in todo)):
                return
            budgets = [self._prepare(s) for s in todo]
            todo = [(s, b) for s, b in zip(todo, budgets, strict=True) if b > 0]
            batched = [(s, b) for s, b in todo if self.sample_fn(s) is None]
            custom = [(s, b) for s, b in todo if self.sample_fn(s) is not None]
            async with anyio.create_task_group() as tg:
                if batched:
                    tg.start_soon(self._batched, [s for s, _ in batched], [b for _, b in batched])
                for s, b in custom:
                    tg.start_soon(self._custom, s, b)

    async def _batched(self, samples: list[Sample], budgets: list[int]) -> None:
        before = sum(s.generated_tokens for s in samples)
        try:
            await generate_group(self.client, samples, [self.sampling_params(b) for b in budgets])
        finally:  # what the samples gained, even when a call failed midway (read after the await: no race)
            self.stats["tokens_generated"] += sum(s.generated_tokens for s in samples) - before
            self._last_progress = time.monotonic()

    async def _custom(self, s: Sample, budget: int) -> None:
        before = s.generated_tokens
        try:
            out = await self.sample_fn(s)(self.args, s, self.sampling_params(budget))
        finally:
            self.stats["tokens_generated"] += s.generated_tokens - before
        if out is not None and out is not s:
            raise EngineError(f"custom generate returned a different Sample object for sample {s.index}")
        if s.status == Status.PENDING:  # a function that neither finished nor aborted the sample: stop it there
            s.status = Status.COMPLETED

    def sampling_params(self, max_new_tokens: int, temperature: float | None = None,
                        top_p: float | None = None) -> dict[str, Any]:
        a = self.args
        params = {"temperature": a.rollout_temperature if temperature is None else temperature,
                  "top_p": a.rollout_top_p if top_p is None else top_p, "top_k": a.rollout_top_k,
                  "max_new_tokens": max_new_tokens,
                  "no_stop_trim": True, "skip_special_tokens": False}
        if a.rollout_stop:
            params["stop"] = list(a.rollout_stop)
        if a.rollout_stop_token_ids:
            params["stop_token_ids"] = list(a.rollout_stop_token_ids)
        return params

    # --- evaluation -----------------------------------------------------------------------------------------
    async def evaluate(self, step: int = 0) -> dict[str, float]:
        """Eval metrics per dataset (`eval/<name>/reward`, ...) and `eval/reward`, tagged with the weight version
        they measured; runs alongside training (see `evaluation.py`)."""
        return await self.evaluator(step)


__all__ = ["RolloutManager", "generate"]
