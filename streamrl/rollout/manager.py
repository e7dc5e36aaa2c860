"""RolloutManager: the producers (a Ray async actor). Keeps groups in flight, generates, scores, puts groups.

    data source ──> admit (pacing: in flight < limit, admitted < (v+K+1)·N·B) ──> one task per group
    group task:  every sample: /generate ... (abort -> partial: resubmit prompt+prefix; the engine holds it while
                 paused) ... reward ──> buffer.put([group])   (blocks while the buffer is full: backpressure)

A group goes to the buffer as soon as its own samples are scored, never waiting for a batch. Every group taken
from the data source is admitted in the buffer's ledger; failures (engine or reward errors) are recorded there
with their reason.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import anyio

from buffers.admission import admission_limit, groups_per_step
from streamrl.rollout.client import EngineClient, EngineError
from streamrl.types import Group, Sample, Status


class RolloutManager:
    def __init__(self, args: argparse.Namespace, buffer: Any, engine_urls: list[str]):
        from transformers import AutoTokenizer

        from streamrl.data import PromptSource, load_prompts
        from streamrl.rollout.rewards import load_reward_fn

        self.args, self.buffer = args, buffer
        self.client = EngineClient(engine_urls, max_connections=args.sglang_server_concurrency * len(engine_urls))
        self.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        records, self.skipped = load_prompts(
            args.prompt_data, args.input_key, args.label_key, args.metadata_key, tokenizer=self.tokenizer,
            apply_chat_template=args.apply_chat_template, max_prompt_len=args.rollout_max_prompt_len)
        if not records:
            raise ValueError(f"--prompt-data {args.prompt_data}: no usable prompts (skipped: {self.skipped[:3]})")
        self.source = PromptSource(records, args.n_samples_per_prompt, rollout_shuffle=args.rollout_shuffle,
                                   rollout_seed=args.rollout_seed, max_epochs=args.num_epoch)
        self.reward_fn = load_reward_fn(args)
        self.generate_fn = None
        if args.custom_generate_function_path:
            from streamrl.plugins import load_function

            self.generate_fn = load_function(args.custom_generate_function_path, what="--custom-generate-function-path")
        self.version = 0
        self.admitted = 0
        self.in_flight = 0
        self.stopping = False
        self.exhausted = False
        self.partials: list[Group] = []  # groups cut off by stop(), kept for a checkpoint/resume
        self.stats = {"groups_done": 0, "groups_failed": 0, "samples_done": 0, "tokens_generated": 0,
                      "partial_resumes": 0, "aborted_regenerated": 0, "wasted_tokens": 0,
                      "regenerated_groups": 0}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._errors: list[str] = []
        self.fatal: str | None = None

    # --- control (called by the driver) ---------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._produce())

    async def set_version(self, version: int) -> None:
        self.version = version
        self._wake.set()

    async def get_stats(self) -> dict[str, Any]:
        return {**self.stats, "in_flight": self.in_flight, "admitted": self.admitted, "version": self.version,
                "exhausted": self.exhausted, "fatal": self.fatal, "errors": list(self._errors[-5:]),
                "skipped_prompts": len(self.skipped)}

    async def stop(self) -> dict[str, Any]:
        """Stop admitting, abort in-flight requests and wait for every group task to settle."""
        self.stopping = True
        self._wake.set()
        await self.client.post_all("/abort_request", {"abort_all": True})
        if self._task is not None:
            with anyio.fail_after(60):
                await self._task
        return await self.get_stats()

    async def close(self) -> None:
        await self.client.aclose()

    # --- the producer loop ----------------------------------------------------------------------------------
    async def _produce(self) -> None:
        try:
            await self._produce_loop()
        except BaseException:  # surfaced to the driver through get_stats()["fatal"]
            import traceback

            self.fatal = traceback.format_exc()
            raise

    def _admissible(self) -> int:
        """How many groups may start now (in-flight cap and the staleness pacing bound)."""
        a = self.args
        cap = a.rollout_max_groups_in_flight - self.in_flight
        pace = admission_limit(self.version, a.max_staleness, a.update_weights_interval, groups_per_step(a))
        return max(0, min(cap, pace - self.admitted))

    async def _produce_loop(self) -> None:
        last_regen_check = 0.0
        async with anyio.create_task_group() as tg:
            while not self.stopping:
                k = self._admissible()
                if k == 0:
                    self._wake.clear()
                    with anyio.move_on_after(0.5):
                        await self._wake.wait()
                    continue
                groups: list[Group] = []
                if time.monotonic() - last_regen_check > 0.5:  # stale groups sent back by the buffer (rare)
                    last_regen_check = time.monotonic()
                    groups = await self.buffer.take_regenerate.remote(k)
                    self.stats["regenerated_groups"] += len(groups)
                new = [g for g in (self.source.next_group() for _ in range(k - len(groups))) if g is not None]
                if new:  # one ledger call for the whole batch of admissions
                    await self.buffer.admit.remote([g[0].group_id for g in new])
                for group in groups + new:
                    self.admitted += 1
                    self.in_flight += 1
                    tg.start_soon(self._run_group, group)
                if len(groups) + len(new) < k:
                    self.exhausted = True
                    break

    async def _run_group(self, group: Group) -> None:
        gid = group[0].group_id
        try:
            await self._generate_group(group)
            if self.stopping and any(s.status in (Status.PENDING, Status.ABORTED) for s in group):
                self.partials.append(group)
                await self.buffer.mark.remote(gid, "partial", "stopped")
                return
            for s in group:
                s.response = self.tokenizer.decode(s.tokens[s.prompt_length:], skip_special_tokens=True)
                try:
                    s.reward = await self.reward_fn(self.args, s)
                except Exception as e:  # a user's reward function: record the group as failed, with the reason
                    raise RewardError(f"reward function failed on sample {s.index} ({gid}): {e!r}") from e
            self.stats["groups_done"] += 1
            self.stats["samples_done"] += len(group)
            if not await self._queue(group):
                self.partials.append(group)
                await self.buffer.mark.remote(gid, "partial", "stopped before queued")
        except* (EngineError, RewardError) as eg:
            reason = "; ".join(str(e) for e in eg.exceptions)[:500]
            self._errors.append(reason)
            self.stats["groups_failed"] += 1
            await self.buffer.mark.remote(gid, "failed", reason)
        finally:
            self.in_flight -= 1
            self._wake.set()

    async def _queue(self, group: Group) -> bool:
        """Put a finished group, waiting while the buffer is full; False if the job stopped meanwhile."""
        while True:
            try:
                await self.buffer.put.remote([group], timeout=1.0)
                return True
            except TimeoutError:
                if self.stopping:
                    return False

    def _prepare(self, s: Sample) -> int:
        """Bookkeeping before a (re)submission; returns the remaining token budget (0: nothing to generate)."""
        a = self.args
        remaining = a.rollout_max_response_len - s.response_length
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
                self.stats["wasted_tokens"] += s.response_length
                s.reset_response()
                remaining = a.rollout_max_response_len
        return remaining

    async def _generate_group(self, group: Group) -> None:
        """Generate every unfinished sample of the group in one batched /generate per round (SGLang batch input:
        one HTTP request per group instead of one per sample); aborted samples go round again (partial rollout)."""
        if self.generate_fn is not None:  # slime's per-sample contract: async generate(args, sample, params)
            async with anyio.create_task_group() as tg:
                for s in group:
                    tg.start_soon(self._custom_generate, s)
            return
        while True:
            todo = [s for s in group if s.status not in (Status.COMPLETED, Status.TRUNCATED)]
            if not todo or (self.stopping and any(s.status == Status.ABORTED for s in todo)):
                return
            budgets = [self._prepare(s) for s in todo]
            todo = [s for s, b in zip(todo, budgets, strict=True) if b > 0]
            if not todo:
                continue
            t0 = time.time()
            outs = await self.client.generate({
                "input_ids": [s.tokens for s in todo], "return_logprob": True,
                "sampling_params": [self.sampling_params(b) for b in budgets if b > 0],
                "rid": [uuid.uuid4().hex for _ in todo]})
            for s, out in zip(todo, outs, strict=True):
                meta = out["meta_info"]
                pairs = meta.get("output_token_logprobs") or []
                s.append_response_tokens(tokens=[int(p[1]) for p in pairs], log_probs=[float(p[0]) for p in pairs],
                                         version=int(meta["weight_version"]),
                                         finish_reason=meta["finish_reason"]["type"])
                self.stats["tokens_generated"] += len(pairs)
                s.metadata["generation_time"] = s.metadata.get("generation_time", 0.0) + time.time() - t0

    async def _custom_generate(self, s: Sample) -> None:
        while s.status not in (Status.COMPLETED, Status.TRUNCATED):
            if self.stopping and s.status == Status.ABORTED:
                return
            remaining = self._prepare(s)
            if remaining == 0:
                return
            await self.generate_fn(self.args, s, self.sampling_params(remaining))

    def sampling_params(self, max_new_tokens: int, temperature: float | None = None) -> dict[str, Any]:
        a = self.args
        params = {"temperature": a.rollout_temperature if temperature is None else temperature,
                  "top_p": a.rollout_top_p, "top_k": a.rollout_top_k, "max_new_tokens": max_new_tokens,
                  "no_stop_trim": True, "skip_special_tokens": False}
        if a.rollout_stop_token_ids:
            params["stop_token_ids"] = list(a.rollout_stop_token_ids)
        return params

    # --- evaluation -----------------------------------------------------------------------------------------
    async def evaluate(self, path: str, n: int, temperature: float) -> dict[str, float]:
        """Mean reward on held-out prompts, generated by the engines' current weights (alongside training).

        An eval request cut by a weight sync restarts from its prompt, so each eval sample comes from one version;
        the versions seen are reported.
        """
        from streamrl.data import load_prompts

        records, _ = load_prompts(path, self.args.input_key, self.args.label_key, self.args.metadata_key,
                                  tokenizer=self.tokenizer, apply_chat_template=self.args.apply_chat_template)
        results: list[tuple[float, int]] = []

        async def one(rec) -> None:
            while True:
                out = await self.client.generate({
                    "input_ids": rec.prompt_ids, "return_logprob": False,
                    "sampling_params": self.sampling_params(self.args.rollout_max_response_len, temperature)})
                if out["meta_info"]["finish_reason"]["type"] != "abort":
                    break
            s = Sample(prompt=rec.prompt, label=rec.label, metadata=dict(rec.metadata))
            s.response = self.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
            results.append((await self.reward_fn(self.args, s), int(out["meta_info"]["weight_version"])))

        async with anyio.create_task_group() as tg:
            for rec in records:
                for _ in range(n):
                    tg.start_soon(one, rec)
        versions = [v for _, v in results]
        return {"eval/reward": sum(r for r, _ in results) / len(results), "eval/n": float(len(results)),
                "eval/version_min": float(min(versions)), "eval/version_max": float(max(versions))}


class RewardError(RuntimeError):
    """A reward function raised; the group is recorded as failed with this message."""
