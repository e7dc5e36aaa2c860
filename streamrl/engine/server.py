"""Starlette app speaking SGLang's native HTTP API over a `Scheduler`, and a uvicorn runner in a background thread.

Handlers never touch the model: they submit `Request`s and await an asyncio.Queue that the scheduler thread feeds
through `loop.call_soon_threadsafe`; blocking calls (pause, weight loads) run in worker threads. Every malformed
input is a 400 `{"error": {"message": ...}}`; weight endpoints answer `{"success": false, "message": ...}` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from streamrl.weights.layout import UpdateWeightsFromIpcRequest
from streamrl.weights.pinned import UpdateWeightsFromPinnedRequest
from streamrl.weights.tensor import UpdateWeightsFromTensorRequest, deserialize_named_tensors

from .distributed import WeightsUpdateGroups
from .memory import MemoryOccupation
from .protocol import (
    AbortRequest,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    MetaInfo,
    PauseRequest,
    SamplingParams,
    UpdateWeightsFromDiskRequest,
    check_context,
)
from .receive import engine_copy_plan, engine_copy_plan_pinned, forget_ipc
from .scheduler import Request, RequestOutput, Scheduler

_BAD_INPUT = (msgspec.DecodeError, msgspec.ValidationError, ValueError)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def _error(message: str, status: int = 400) -> Response:
    return _json(ErrorBody.of(message, status), status)


# Bodies above this are parsed (JSON, tokenizing, per-token checks) in a worker thread, so a huge `text` or
# `input_ids` cannot block the event loop (and with it /health and /abort_request) for seconds.
_INLINE_BODY_BYTES = 64 * 1024


def _decode_bytes(body: bytes, typ: type) -> Any:
    try:
        return msgspec.json.decode(body, type=typ)
    except RecursionError:  # msgspec's depth limit: a 400 like any malformed body, not a 500 and a dropped socket
        raise ValueError("JSON body nested too deeply") from None


async def _decode(request: HttpRequest, typ: type, *, empty_ok: bool = True) -> Any:
    body = await request.body()
    if not body.strip() and empty_ok:
        body = b"{}"  # slime sends `{}`, curl users sometimes send nothing
    return _decode_bytes(body, typ)


def _listener(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[RequestOutput], None]:
    def put(out: RequestOutput) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed (server shutting down)
            loop.call_soon_threadsafe(queue.put_nowait, out)

    return put


async def _until_disconnect(request: HttpRequest) -> None:
    # After the body is read, the ASGI receive channel only yields again when the client goes away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _final(queue: asyncio.Queue) -> RequestOutput:
    while not (out := await queue.get()).finished:
        pass
    return out


def build_app(scheduler: Scheduler, *, loader: Callable[[str], Any] | None = None) -> Starlette:
    """The HTTP app. `loader(model_path) -> nn.Module` enables /update_weights_from_disk."""
    sch = scheduler
    tok = sch.tokenizer
    memory = MemoryOccupation(sch)  # /release_memory_occupation, /resume_memory_occupation (memory.py)
    groups = WeightsUpdateGroups(sch)  # /init_weights_update_group, /update_weights_from_distributed

    def render(out: RequestOutput, params: SamplingParams, return_logprob: bool, text_in_lp: bool) -> GenerateResponse:
        text = tok.decode(out.output_ids, skip_special_tokens=params.skip_special_tokens) if tok else ""
        matched = (out.finish_reason or {}).get("matched")
        if isinstance(matched, str) and not params.no_stop_trim and (i := text.find(matched)) >= 0:
            text = text[:i]  # SGLang trims a matched stop string from the text (ids keep the token)
        meta = MetaInfo(
            id=out.rid,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=len(out.output_ids),
            finish_reason=out.finish_reason,
            weight_version=out.weight_version,
        )
        if len(out.version_starts) > 1:
            meta.weight_version_starts = out.version_starts
        if return_logprob:
            meta.output_token_logprobs = [
                (lp, t, tok.decode([t]) if (text_in_lp and tok) else None)
                for lp, t in zip(out.output_logprobs, out.output_ids, strict=True)
            ]
        return GenerateResponse(text=text, output_ids=out.output_ids, meta_info=meta)

    # A token spans at most `longest` characters, so a text over `longest * context` characters cannot fit: refused
    # before tokenizing (4x margin for normalizers that merge characters); a 10 MB text costs nothing.
    longest = max(map(len, tok.get_vocab()), default=1) if tok is not None else 1
    text_limit = 4 * longest * sch.max_positions

    def tokenize(text: str) -> list[int]:
        if len(text) > text_limit:
            raise ValueError(f"The input (at least {len(text) // longest} tokens: {len(text)} characters) is longer "
                             f"than the model's context length ({sch.max_positions} tokens).")
        return tok.encode(text)

    def parse_generate(body: GenerateRequest) -> tuple[list[tuple[str, list[int], SamplingParams]], bool]:
        tokenize_or_none = tokenize if tok is not None else None
        prompts, batch = body.prompts(tokenize_or_none, sch.vocab_size)
        if body.stream and batch:
            raise ValueError("stream=true supports a single prompt only")
        rids = body.rid if isinstance(body.rid, list) else [body.rid or uuid.uuid4().hex]
        if batch and not isinstance(body.rid, list):
            rids = [uuid.uuid4().hex for _ in prompts]
        items = []
        for i, prompt in enumerate(prompts):
            params = body.params_for(i)
            params.check(sch.vocab_size)
            if params.stop_strings and tok is None:
                raise ValueError("stop strings need a tokenizer; use stop_token_ids")
            check_context(len(prompt), params.max_new_tokens, sch.max_positions)
            items.append((rids[i], prompt, params))
        return items, batch

    def decode_generate(raw: bytes) -> tuple[GenerateRequest, list[tuple[str, list[int], SamplingParams]], bool]:
        body = _decode_bytes(raw, GenerateRequest)
        return body, *parse_generate(body)

    async def generate(request: HttpRequest) -> Response:
        try:
            raw = await request.body()
            if len(raw) <= _INLINE_BODY_BYTES:
                body, items, batch = decode_generate(raw)
            else:
                body, items, batch = await anyio.to_thread.run_sync(decode_generate, raw)
        except _BAD_INPUT as e:
            return _error(str(e))
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue] = []
        try:
            for rid, prompt, params in items:
                q: asyncio.Queue = asyncio.Queue()
                sch.submit(Request(rid, prompt, params, stream=body.stream, on_event=_listener(loop, q)))
                queues.append(q)
        except (ValueError, RuntimeError) as e:  # duplicate rid / stopped: take back what was queued
            for rid, _, _ in items[: len(queues)]:
                sch.abort(rid)
            return _error(str(e))
        rids = [rid for rid, _, _ in items]
        if body.stream:
            return StreamingResponse(_stream(queues[0], items[0], body), media_type="text/event-stream")
        collect = asyncio.ensure_future(asyncio.gather(*(_final(q) for q in queues)))
        watch = asyncio.ensure_future(_until_disconnect(request))
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # client went away: free the batch slots (SGLang aborts too)
            for rid in rids:
                sch.abort(rid, "client disconnected")
        watch.cancel()
        outs = await collect
        lp, lp_text = body.return_logprob, body.return_text_in_logprobs
        res = [render(o, p, lp, lp_text) for o, (_, _, p) in zip(outs, items, strict=True)]
        return _json(res if batch else res[0])

    async def _stream(queue: asyncio.Queue, item: tuple, body: GenerateRequest):
        rid, _, params = item
        finished = False
        try:
            while not finished:
                out = await queue.get()
                while not out.finished and not queue.empty():  # cumulative events: skip to the newest
                    out = queue.get_nowait()
                finished = out.finished
                res = render(out, params, body.return_logprob, body.return_text_in_logprobs)
                yield b"data: " + msgspec.json.encode(res) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:
                sch.abort(rid, "client disconnected")

    async def abort_request(request: HttpRequest) -> Response:
        try:
            body = await _decode(request, AbortRequest)
        except _BAD_INPUT as e:
            return _error(str(e))
        if body.abort_all:
            sch.abort_all()
        for rid in [body.rid] if isinstance(body.rid, str) else body.rid or []:
            sch.abort(rid)
        return Response(status_code=200)

    async def pause_generation(request: HttpRequest) -> Response:
        try:
            body = await _decode(request, PauseRequest)
            if body.mode not in ("abort", "in_place", "retract"):
                raise ValueError(f"unknown mode {body.mode!r}; use abort, retract or in_place")
        except _BAD_INPUT as e:
            return _error(str(e))
        if not sch.pause_if_idle():  # else wait (in a thread) for in-flight requests to return or stop
            await anyio.to_thread.run_sync(sch.pause, body.mode)
        return _json({"message": "Generation paused successfully."})

    async def continue_generation(request: HttpRequest) -> Response:
        sch.resume()
        return _json({"message": "Generation continued successfully."})

    async def update_from_tensor(request: HttpRequest) -> Response:
        raw = await request.body()
        try:
            if "json" in request.headers.get("content-type", ""):
                body = msgspec.json.decode(raw, type=UpdateWeightsFromTensorRequest)
            else:
                body = msgspec.msgpack.decode(raw, type=UpdateWeightsFromTensorRequest)
            named = deserialize_named_tensors(body.named_tensors)
            await anyio.to_thread.run_sync(sch.update_weights, named, body.weight_version)
        except _BAD_INPUT as e:
            return _json({"success": False, "message": str(e)}, 400)
        return _json({"success": True, "message": ""})

    async def update_from_ipc(request: HttpRequest) -> Response:
        """CUDA IPC buckets from a trainer on the same GPU (streamrl/sync/cuda_ipc.py); copied on the device."""
        try:
            body = msgspec.msgpack.decode(await request.body(), type=UpdateWeightsFromIpcRequest)
            pairs = engine_copy_plan(body.buckets, sch.flat_index, sch.params())

            def copy() -> float:

                t0 = time.perf_counter()
                sch.copy_weights(pairs, body.weight_version)
                torch.cuda.synchronize()  # finish reading the trainer's buckets before it answers (and refills)
                return time.perf_counter() - t0

            # paused (the sync sequence): nothing to wait for, a ~1 ms device copy runs here; else in a thread
            copy_time = copy() if sch.idle_paused() else await anyio.to_thread.run_sync(copy)
            if memory.released:  # a colocated sync: let go of the trainer's buckets, which it frees next
                forget_ipc()
        except (*_BAD_INPUT, RuntimeError) as e:
            return _json({"success": False, "message": f"{type(e).__name__}: {e}"}, 400)
        return _json({"success": True, "message": "", "copy_time": copy_time})

    async def update_from_pinned(request: HttpRequest) -> Response:
        """Host-pinned shared memory from a trainer on this host (streamrl/sync/pinned.py); one H2D copy per bucket."""
        try:
            body = msgspec.msgpack.decode(await request.body(), type=UpdateWeightsFromPinnedRequest)
            pairs = engine_copy_plan_pinned(body, sch.flat_index, sch.params())

            def copy() -> float:

                t0 = time.perf_counter()
                sch.copy_weights(pairs, body.weight_version)
                if sch.device.type == "cuda":
                    torch.cuda.synchronize()  # the host-to-device copies are asynchronous
                return time.perf_counter() - t0

            copy_time = await anyio.to_thread.run_sync(copy)
        except (*_BAD_INPUT, RuntimeError, OSError) as e:
            return _json({"success": False, "message": f"{type(e).__name__}: {e}"}, 400)
        return _json({"success": True, "message": "", "copy_time": copy_time})

    async def weights_checksum(request: HttpRequest) -> Response:
        """{name: float64 sum} of every weight, read between forwards (checks a sync landed exactly)."""

        def sums(model):
            sch.check_weights_resident()  # a released weight has no bytes to read
            return {k: float(v.detach().double().sum()) for k, v in model.state_dict().items()}

        try:
            return _json(await anyio.to_thread.run_sync(sch.run_exclusive, sums))
        except ValueError as e:
            return _error(str(e))

    async def update_from_disk(request: HttpRequest) -> Response:
        try:
            body = await _decode(request, UpdateWeightsFromDiskRequest, empty_ok=False)
            if loader is None:
                raise ValueError("this engine was started without a model loader")
            model = await anyio.to_thread.run_sync(loader, body.model_path)
            named = list(model.state_dict().items())
            await anyio.to_thread.run_sync(sch.update_weights, named, body.weight_version, body.model_path)
        except (*_BAD_INPUT, OSError) as e:
            return _json({"success": False, "message": f"{type(e).__name__}: {e}"}, 400)
        return _json({"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0})

    async def get_weight_version(request: HttpRequest) -> Response:
        return _json({"weight_version": sch.weight_version})

    def info() -> dict[str, Any]:
        cfg = getattr(sch.model, "config", None)
        path = sch.model_path
        return {"model_path": path, "tokenizer_path": path if tok is not None else None, "is_generation": True,
                "weight_version": sch.weight_version, "model_type": getattr(cfg, "model_type", None),
                "architectures": getattr(cfg, "architectures", None), "has_image_understanding": False}  # fmt: skip

    async def model_info(request: HttpRequest) -> Response:
        return _json(info())

    async def server_info(request: HttpRequest) -> Response:
        state = {"weight_version": sch.weight_version, "paused": sch.paused, **sch.load(), **memory.state(),
                 "busy_time": sch.busy_time,  # seconds in forward steps since start (engine idle fraction)
                 "step_stats": sch.stats()}  # iterations, rows, seconds per phase (streamrl extension)
        limits = {"context_length": sch.max_positions, "max_running_requests": sch.max_running_requests,
                  "tp_size": 1, "dp_size": 1, "pp_size": 1}  # one process, one replica: sglang-router --dp-aware
        return _json({**info(), **limits, "device": str(sch.device), "version": "streamrl-embedded",
                      "internal_states": [state]})  # fmt: skip

    async def loads(request: HttpRequest) -> Response:
        load = sch.load()
        rank = {"dp_rank": 0, **load, "num_total_reqs": sum(load.values())}
        rank["max_running_requests"] = sch.max_running_requests
        # SGLang's shape is {"loads": [per dp rank]}; the flat totals are a convenience for simple pollers.
        return _json({"timestamp": time.time(), "version": "streamrl-embedded", "loads": [rank], **load})

    async def get_load(request: HttpRequest) -> Response:  # deprecated SGLang name
        load = sch.load()
        n = load["num_running_reqs"] + load["num_waiting_reqs"]
        return _json([{"dp_rank": 0, "num_reqs": n, "num_waiting_reqs": load["num_waiting_reqs"], "num_tokens": 0}])

    async def health(request: HttpRequest) -> Response:
        return Response(status_code=200)

    async def health_generate(request: HttpRequest) -> Response:
        q: asyncio.Queue = asyncio.Queue()
        rid = f"HEALTH_CHECK_{uuid.uuid4().hex}"
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        try:
            sch.submit(Request(rid, [0], params, on_event=_listener(asyncio.get_running_loop(), q)))
            out = await asyncio.wait_for(_final(q), timeout=20.0)
        except (TimeoutError, RuntimeError) as e:
            sch.abort(rid)
            return _error(f"health generation failed: {type(e).__name__}", 503)
        return Response(status_code=200 if len(out.output_ids) == 1 else 503)

    async def flush_cache(request: HttpRequest) -> Response:
        return Response("Cache flushed.\n", status_code=200)  # no KV cache yet: always succeeds

    async def on_error(request: HttpRequest, exc: Exception) -> Response:
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    get, post, both = ["GET"], ["POST"], ["GET", "POST"]
    routes = [
        Route("/generate", generate, methods=post),
        Route("/abort_request", abort_request, methods=post),
        Route("/pause_generation", pause_generation, methods=post),
        Route("/continue_generation", continue_generation, methods=post),
        Route("/update_weights_from_tensor", update_from_tensor, methods=post),
        Route("/update_weights_from_disk", update_from_disk, methods=post),
        Route("/update_weights_from_ipc", update_from_ipc, methods=post),
        Route("/update_weights_from_pinned", update_from_pinned, methods=post),
        Route("/weights_checksum", weights_checksum, methods=get),
        Route("/get_weight_version", get_weight_version, methods=get),
        Route("/model_info", model_info, methods=get),
        Route("/get_model_info", model_info, methods=get),
        Route("/server_info", server_info, methods=get),
        Route("/get_server_info", server_info, methods=get),
        Route("/v1/loads", loads, methods=get),
        Route("/get_load", get_load, methods=get),
        Route("/health", health, methods=get),
        Route("/health_generate", health_generate, methods=get),
        Route("/flush_cache", flush_cache, methods=both),
        *memory.routes(),
        *groups.routes(),
    ]
    return Starlette(routes=routes, exception_handlers={Exception: on_error})


class HttpServer:
    """uvicorn in a daemon thread with its own event loop. `port=None` binds a free port (no bind race: we pass
    the already-bound socket to uvicorn)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.app, self.host, self.port = app, host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
        # without it every keep-alive response stalls ~40 ms (Nagle vs. delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port or 0))
        self.port = sock.getsockname()[1]
        # log_level error: sglang-router probes each worker for gRPC first, and uvicorn would warn "Invalid HTTP
        # request received." for every probe (a malformed request is the client's error, answered with a 400 anyway)
        config = uvicorn.Config(
            self.app, log_config=None, log_level="error", access_log=False, lifespan="off",
            timeout_graceful_shutdown=5, loop="asyncio",
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="streamrl-engine-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:  # uvicorn exposes a flag, not an event
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"engine HTTP server failed to start on {self.url}")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
