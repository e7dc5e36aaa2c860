"""Continuous (iteration-level) batching over a HF causal LM. No HTTP here.

A background thread owns the model. Each iteration it admits waiting requests (up to `max_running_requests`), runs
batched forwards over every running request, samples one token per request, appends it and retires the requests
that hit a stop token, their length limit or an abort. New requests join at the next token, not the next batch.

KV cache (`kv_cache=True`, see kv.py): an iteration is at most two forwards, never one per request: cached requests
decode their newest token in one [B, 1] forward over their left-padded K/V; the others (newcomers, and everyone
after a weight update, whose K/V came from the old weights) are prefilled on their full sequence in one left-padded
forward. `kv_cache=False` recomputes the full sequences every step (O(L^2) per request; the tests' reference).

Threading: `_cond` guards the queues and flags; `_model_lock` is held for each iteration's forwards and for weight
loads, so a weight update never lands mid-iteration and every token is attributed to exactly one `weight_version`.
The KV rows are touched by the scheduler thread only.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .flat import flatten_parameters
from .kv import DEFAULT_MAX_PREFILL_TOKENS, KVBatch, left_pad, supports_kv_cache
from .protocol import SamplingParams
from .sampling import sample_tokens
from .static_kv import StaticKV, supports_static_kv
from .timing import StepTimer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestOutput:
    """Immutable snapshot of a request, handed to the HTTP side (safe to read from another thread)."""

    rid: str
    prompt_tokens: int
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: dict[str, Any] | None
    weight_version: str
    # [output index, version] where each version's tokens start: more than one entry when an in-place pause let
    # a weight update land mid-request
    version_starts: list[tuple[int, str]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """One generation. `on_event` is called from the scheduler thread with a RequestOutput: after every token when
    `stream` is set, and always once when the request finishes."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    on_event: Callable[[RequestOutput], None] | None = None
    # Scheduler-owned state.
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    weight_version: str = ""
    version_starts: list[tuple[int, str]] = field(default_factory=list)
    abort_message: str | None = None  # set => abort at the next iteration boundary
    generator: torch.Generator | None = None

    def snapshot(self) -> RequestOutput:
        return RequestOutput(
            rid=self.rid,
            prompt_tokens=len(self.prompt_ids),
            output_ids=list(self.output_ids),
            output_logprobs=list(self.output_logprobs),
            finish_reason=self.finish_reason,
            weight_version=self.weight_version,
            version_starts=list(self.version_starts),
        )


class Scheduler:
    """Owns the model and the batching thread. Public methods are thread-safe.

    Counters for tests/metrics: `forward_steps` (number of batched forwards), `batch_sizes` (size of each) and
    `stats()` (decode/prefill rows and where the time goes, timing.py).
    `kv_cache=False` selects the recompute path; models with non-full-attention layers always use it.
    `num_continuous_decode_steps` (SGLang's flag): waiting requests join the running batch at most every that many
    iterations (unless nothing runs), so a steady trickle of arrivals does not pay an eager prefill per decode step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        max_positions: int,
        eos_token_ids: Iterable[int] = (),
        weight_version: str = "0",
        max_running_requests: int = 256,
        tokenizer: Any = None,
        model_path: str = "",
        kv_cache: bool = True,
        kv_backend: str = "auto",
        max_context_len: int = 1024,
        max_prefill_tokens: int | None = DEFAULT_MAX_PREFILL_TOKENS,
        keep_kv_on_update: bool = False,
        num_continuous_decode_steps: int = 1,
    ) -> None:
        if num_continuous_decode_steps < 1:
            raise ValueError(f"num_continuous_decode_steps must be >= 1, got {num_continuous_decode_steps}")
        self.model = model
        self.num_continuous_decode_steps = num_continuous_decode_steps
        self._since_admit = num_continuous_decode_steps  # iterations since waiting requests were last admitted
        self.keep_kv_on_update = keep_kv_on_update
        self.kv_cache = kv_cache and supports_kv_cache(model)
        if kv_cache and not self.kv_cache:
            logger.warning("model has non-full-attention layers; the engine recomputes sequences without a KV cache")
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.eos_token_ids = frozenset(eos_token_ids)
        self.weight_version = weight_version
        self.max_running_requests = max_running_requests
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.device = next(model.parameters()).device
        # on GPU the weights live in flat buffers laid out as the trainer's CUDA IPC buckets (flat.py): a sync is
        # then one device copy per bucket; done before any CUDA graph captures the parameters' addresses
        self.flat_index = flatten_parameters(model) if self.device.type == "cuda" else {}
        self.forward_steps = 0
        self.busy_time = 0.0  # seconds spent in forward steps (engine idle fraction = 1 - busy / wall)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=100_000)
        self.counts = {"iterations": 0, "rows": 0, "prefill_iterations": 0}
        self.timer = StepTimer(self.device)
        self._cond = threading.Condition()
        self._model_lock = threading.RLock()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._active: dict[str, Request] = {}  # rid -> waiting or running request
        self._paused = False
        self._held = False  # memory released (memory.py): requests wait as during a pause
        self.weights_released = False  # set by memory.py: weight updates are refused meanwhile
        self._stepping = False
        self._stopped = False
        # cached K/V of running requests (scheduler thread only): growing per-batch tensors (kv.py) or, on CUDA,
        # preallocated slots with CUDA-graph decode steps (static_kv.py)
        use_static = kv_backend == "static" or (
            kv_backend == "auto" and self.device.type == "cuda" and supports_static_kv(model))
        if kv_backend not in ("auto", "static", "dynamic"):
            raise ValueError(f"kv_backend must be auto, static or dynamic, got {kv_backend!r}")
        self._kv: KVBatch | StaticKV = (
            StaticKV(model, slots=max_running_requests, max_len=min(max_context_len, max_positions),
                     max_prefill_tokens=max_prefill_tokens)
            if self.kv_cache and use_static else KVBatch(max_prefill_tokens=max_prefill_tokens))
        self._kv.on_phase = self.timer.mark
        self._weights_epoch = 0  # bumped by every weight update
        self._params: dict[str, torch.Tensor] | None = None
        self._kv_epoch = 0  # the epoch whose weights produced `_kv`
        self._thread = threading.Thread(target=self._loop, name="streamrl-engine-scheduler", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything (requests return their prefixes) and join the thread."""
        with self._cond:
            self._stopped = True
            self._mark_abort_locked(self._active.values(), "engine shutting down")
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- requests --------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request. Raises ValueError on a duplicate active rid, RuntimeError after stop()."""
        if req.params.sampling_seed is not None:
            req.generator = torch.Generator().manual_seed(req.params.sampling_seed)
        with self._cond:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            if req.rid in self._active:
                raise ValueError(f"duplicate rid {req.rid!r}")
            self._active[req.rid] = req
            self._waiting.append(req)
            self._cond.notify_all()

    def abort(self, rid: str, message: str = "Abort request") -> None:
        """Abort one request by rid; unknown rids are a no-op."""
        with self._cond:
            req = self._active.get(rid)
            if req is not None:
                self._mark_abort_locked([req], message)

    def abort_all(self, message: str = "Abort all requests") -> None:
        with self._cond:
            self._mark_abort_locked(self._active.values(), message)

    def pause(self, mode: str = "abort", timeout: float | None = None) -> bool:
        """Pause generation. Requests submitted while paused wait in the queue until `resume()`.

        mode "abort": abort every in-flight request and return once they have all been returned (drained).
        mode "in_place" / "retract": keep in-flight requests; return once no forward is running.
        Returns False if `timeout` expired first.
        """
        if mode not in ("abort", "in_place", "retract"):
            raise ValueError(f"unknown pause mode {mode!r}")
        with self._cond:
            self._paused = True
            if mode == "abort":
                targets = list(self._active.values())
                self._mark_abort_locked(targets, "Abort by pause_generation")
                return self._cond.wait_for(lambda: all(r.finish_reason is not None for r in targets), timeout)
            return self._cond.wait_for(lambda: not self._stepping, timeout)

    def pause_if_idle(self) -> bool:
        """Pause at once if nothing is queued, running or stepping (no wait, no thread); else False."""
        with self._cond:
            if self._active or self._stepping:
                return False
            self._paused = True
            return True

    def idle_paused(self) -> bool:
        """Paused with no forward running: a weight copy can run in the caller's thread without waiting."""
        with self._cond:
            return self._paused and not self._stepping

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def hold(self) -> bool:
        """Run no forward until `unhold()` (the engine's memory is released, memory.py), if no request is running
        (a running one holds K/V); False otherwise. Requests submitted meanwhile wait in the queue."""
        with self._cond:
            if self._stepping or self._running:
                return False
            self._held = True
            return True

    def unhold(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def kv(self) -> KVBatch | StaticKV:
        """The K/V cache (memory.py releases and resumes it while the scheduler is held)."""
        return self._kv

    def get(self, rid: str) -> RequestOutput | None:
        """Snapshot of an active (waiting or running) request, None once it has been returned or if unknown."""
        with self._cond:
            req = self._active.get(rid)
            return req.snapshot() if req is not None else None

    def stats(self) -> dict[str, float]:
        """Iterations, rows decoded or prefilled, and seconds per phase (`time_decode`, `time_prefill`,
        `time_sample`, `time_host`; timing.py) since start: mean batch = rows / iterations."""
        with self._cond:
            return {**self.counts, "prefill_rows": self._kv.prefill_rows,
                    **{f"time_{k}": v for k, v in self.timer.totals.items() if k}}

    def load(self) -> dict[str, int]:
        """Counts of running and waiting requests (waiting includes requests held by a pause)."""
        with self._cond:
            # A finished request stays in _running until its iteration ends, but its answer is already out.
            running = sum(r.finish_reason is None for r in self._running)
            return {"num_running_reqs": running, "num_waiting_reqs": len(self._waiting)}

    # ---- weights ---------------------------------------------------------------------------------------------
    def update_weights(
        self, named: list[tuple[str, torch.Tensor]], weight_version: str | None = None, model_path: str | None = None
    ) -> None:
        """Copy tensors into the model by state-dict name, between forwards. All names and shapes are checked
        before anything is written, so a bad update leaves the model unchanged (ValueError)."""
        self.check_weights_resident()
        params = self.params()
        for name, t in named:
            if name not in params:
                raise ValueError(f"unknown parameter name {name!r}")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != model shape {tuple(params[name].shape)}")
        with self._model_lock, torch.no_grad():
            same = [(params[n], t) for n, t in named if t.device == params[n].device and t.dtype == params[n].dtype]
            if same:  # one multi-tensor copy (a GPU sync of hundreds of tensors in a few kernels)
                torch._foreach_copy_([p for p, _ in same], [t for _, t in same])
            for name, t in named:
                if t.device != params[name].device or t.dtype != params[name].dtype:
                    params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
            if weight_version is not None:
                self.weight_version = str(weight_version)
            if model_path is not None:
                self.model_path = model_path
            self._weights_epoch += 1  # cached K/V is stale: the next iteration re-prefills (scheduler thread)

    def params(self) -> dict[str, torch.Tensor]:
        """{state-dict name: tensor} sharing storage with the model (cached: building it costs milliseconds)."""
        if self._params is None:
            self._params = self.model.state_dict()  # tied aliases (lm_head.weight) share storage with the original
        return self._params

    def copy_weights(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], weight_version: str | None) -> None:
        """Apply prepared [(destination, source)] device copies (already checked, see cuda_ipc.copy_plan) between
        forwards, then move the version."""
        self.check_weights_resident()
        with self._model_lock, torch.no_grad():
            if len(pairs) <= 16:  # whole buckets: one memcpy each beats the multi-tensor copy kernel
                for d, s in pairs:
                    d.copy_(s, non_blocking=True)
            else:
                torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
            if weight_version is not None:
                self.weight_version = str(weight_version)
            self._weights_epoch += 1

    def check_weights_resident(self) -> None:
        if self.weights_released:
            raise ValueError("the weights are released (/release_memory_occupation): resume them with "
                             "/resume_memory_occupation {\"tags\": [\"weights\"]} before updating them")

    def run_exclusive(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """Run fn(model) while no forward is in flight (e.g. to read a consistent state dict)."""
        with self._model_lock, torch.no_grad():
            return fn(self.model)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _mark_abort_locked(self, reqs: Iterable[Request], message: str) -> None:
        for r in reqs:
            if r.abort_message is None and r.finish_reason is None:
                r.abort_message = message
        self._cond.notify_all()

    def _finish(self, req: Request, reason: dict[str, Any]) -> None:
        req.finish_reason = reason
        if not req.weight_version:  # no token generated: report the weights it would have used
            req.weight_version = self.weight_version
        self._emit(req)

    def _emit(self, req: Request) -> None:
        if req.on_event is not None:
            try:
                req.on_event(req.snapshot())
            except Exception:  # a broken listener must not kill the loop
                logger.exception("on_event failed for %s", req.rid)

    def _reap_locked(self) -> None:
        """Retire aborted requests and requests that need no forward (max_new_tokens == 0)."""
        for queue in (self._waiting, self._running):
            keep = []
            for r in queue:
                if r.abort_message is not None:
                    self._finish(r, {"type": "abort", "message": r.abort_message})
                elif r.params.max_new_tokens == 0:
                    self._finish(r, {"type": "length", "length": 0})
                else:
                    keep.append(r)
                    continue
                self._active.pop(r.rid, None)
            queue.clear()
            queue.extend(keep)
        self._kv.retain(self._running)  # free the K/V of aborted requests now, not at the next forward
        self._cond.notify_all()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while True:
                    self._reap_locked()
                    if self._stopped and not self._active:
                        return
                    if not self._paused and not self._held:
                        if not self._running or self._since_admit >= self.num_continuous_decode_steps:
                            admitted = 0
                            while self._waiting and len(self._running) < self.max_running_requests:
                                self._running.append(self._waiting.popleft())
                                admitted += 1
                            if admitted:
                                self._since_admit = 0
                        if self._running:
                            break
                    self._cond.wait()
                batch = list(self._running)
                self._stepping = True
                self._since_admit += 1
            t0 = time.perf_counter()
            try:
                self._step(batch)
            except Exception as e:  # keep serving: fail this batch, not the engine
                logger.exception("forward step failed")
                self._kv.clear()  # may be half-updated; the whole batch is aborted anyway
                with self._cond:
                    self._mark_abort_locked(batch, f"engine error: {type(e).__name__}: {e}")
            with self._cond:
                self.busy_time += time.perf_counter() - t0
                self._stepping = False
                for r in batch:
                    if r.finish_reason is not None:
                        self._active.pop(r.rid, None)
                self._running = [r for r in self._running if r.finish_reason is None]
                self._cond.notify_all()

    def _step(self, batch: list[Request]) -> None:
        # One lock hold for the whole iteration: a weight update never lands between its two forwards.
        with self._model_lock, torch.inference_mode():
            self.timer.begin()
            prefilled = self._kv.prefill_rows
            rows, logits = self._forward_batch(batch)
            p = [r.params for r in rows]
            dev = self.device
            temps = torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev)
            top_ps = torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev)
            top_ks = torch.tensor([x.top_k for x in p], dtype=torch.long, device=dev)
            tokens, logprobs = sample_tokens(logits, temps, top_ps, top_ks, [r.generator for r in rows])
            self.timer.mark("sample")
            version = self.weight_version
            tokens, logprobs = tokens.tolist(), logprobs.tolist()  # the iteration's one host sync
        with self._cond:  # so that get() never sees ids and logprobs of different lengths
            self.timer.end()  # under the lock that stats() reads the totals with
            self.counts["iterations"] += 1
            self.counts["rows"] += len(rows)
            self.counts["prefill_iterations"] += int(self._kv.prefill_rows != prefilled)
            for r, tok, lp in zip(rows, tokens, logprobs, strict=True):
                if version != r.weight_version:
                    r.version_starts.append((len(r.output_ids), version))
                r.output_ids.append(tok)
                r.output_logprobs.append(lp)
                r.weight_version = version
                reason = self._check_finished(r)
                if reason is not None:
                    self._finish(r, reason)
                elif r.stream:
                    self._emit(r)
        self._kv.retain(r for r in rows if r.finish_reason is None)  # free finished requests' K/V

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any = None):
        """One batched forward; returns next-token logits [B, vocab]. `cache` (if any) is updated in place."""
        dev = self.device
        out = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                         past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)  # fmt: skip
        self.forward_steps += 1
        self.batch_sizes.append(input_ids.shape[0])
        return out.logits[:, -1, : self.vocab_size]

    def _forward_batch(self, batch: list[Request]) -> tuple[list[Request], torch.Tensor]:
        """(requests in logits order, next-token logits). Cached: decode the cached requests and prefill the others
        (kv.py); recompute: the whole left-padded sequences."""
        if not self.kv_cache:
            return batch, self._forward(*left_pad([r.prompt_ids + r.output_ids for r in batch]))
        if self._kv_epoch != self._weights_epoch:  # K/V from older weights: re-prefill every running request,
            if not self.keep_kv_on_update:  # unless told to keep it (SGLang's in-place behaviour)
                self._kv.clear()
            self._kv_epoch = self._weights_epoch
        return self._kv.step(batch, self._forward)

    def _check_finished(self, r: Request) -> dict[str, Any] | None:
        """SGLang's order: the length limit first, then stop tokens, then stop strings."""
        n = len(r.output_ids)
        limit = r.params.max_new_tokens
        if (limit is not None and n >= limit) or len(r.prompt_ids) + n >= self.max_positions:
            return {"type": "length", "length": n}
        tok = r.output_ids[-1]
        # ignore_eos also disables stop_token_ids (SGLang), but not stop strings.
        if not r.params.ignore_eos and (tok in self.eos_token_ids or tok in (r.params.stop_token_ids or ())):
            return {"type": "stop", "matched": tok}
        stops = r.params.stop_strings
        if stops and self.tokenizer is not None:
            tail = self.tokenizer.decode(r.output_ids[-(max(map(len, stops)) + 8) :])
            for s in stops:
                if s in tail:
                    return {"type": "stop", "matched": s}
        return None
