"""The built-in generation routines, and slime's `generate(args, sample, sampling_params)` for plug-ins.

  * `generate_group`: one batched `/generate` per group and token budget (a batch carries ONE sampling_params dict
    and no rid list: that is what sglang-router accepts); aborted samples are returned ABORTED with their prefix.
  * `generate`, slime's per-sample contract (token in, token out, resumes from `sample.tokens`).
  * `generate_streaming`: the same with `"stream": true`; the sample follows every cumulative event, so an abort
    or a broken connection leaves a coherent prefix (slime's `sglang_streaming_rollout`).

Plug-ins running in the producers (custom generate functions, rollout functions) reach the engines through
`post_generate(args, payload)`: the producers' client (router or least busy engine), or a client built from
`args.sglang_router_ip/port` when called elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import weakref
from typing import Any

from streamrl.rollout.client import EngineClient, EngineError, EngineLost
from streamrl.types import Group, Sample, Status

_ENDPOINTS: dict[str, Any] = {"urls": [], "router_url": None}
# One client per event loop (an httpx client belongs to the loop it was made in); weak keys: a closed loop's entry
# goes away with it, so a new loop never inherits a stale client.
_CLIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_endpoints(urls: list[str], router_url: str | None) -> None:
    """Where `post_generate` sends requests (the producers call this at start)."""
    _ENDPOINTS.update(urls=list(urls), router_url=router_url)


def register_client(client: EngineClient) -> None:
    """Use `client` for `post_generate` calls made on the current event loop."""
    _CLIENTS[asyncio.get_running_loop()] = client


def client_for(args: argparse.Namespace | None = None) -> EngineClient:
    loop_id = asyncio.get_running_loop()
    if loop_id not in _CLIENTS:
        urls, router = _ENDPOINTS["urls"], _ENDPOINTS["router_url"]
        if not urls and not router and args is not None and args.sglang_router_ip:
            router = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
        _CLIENTS[loop_id] = EngineClient(urls, router_url=router)
    return _CLIENTS[loop_id]


async def post_generate(args: argparse.Namespace, payload: dict) -> Any:
    """POST /generate through the producers' engines (router or least busy engine)."""
    return await client_for(args).generate(payload)


def _version(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def weight_version(meta: dict[str, Any]) -> int:
    """SGLang's `weight_version` string as the integer policy version streamrl publishes ("default" -> 0)."""
    return _version(meta.get("weight_version", 0))


def token_versions(meta: dict[str, Any], n: int) -> int | list[int]:
    """The version of each of the `n` output tokens: one int for the whole output, or a list when a weight update
    landed mid-request (an in-place pause; the embedded engine reports `weight_version_starts`)."""
    starts = meta.get("weight_version_starts")
    if not starts or len(starts) < 2:
        return weight_version(meta)
    out: list[int] = []
    for (i, v), nxt in zip(starts, [*(s[0] for s in starts[1:]), n], strict=True):
        out.extend([_version(v)] * (int(nxt) - int(i)))
    if len(out) != n:
        raise EngineError(f"weight_version_starts {starts!r} do not cover {n} output tokens")
    return out


def apply_output(sample: Sample, out: dict[str, Any], t0: float | None = None) -> int:
    """Append one /generate result to `sample` (trainable tokens with their log-probs); returns tokens added."""
    meta = out["meta_info"]
    pairs = meta.get("output_token_logprobs") or []
    if len(pairs) != len(out.get("output_ids") or []):  # never drop tokens silently: training needs their log-probs
        raise EngineError(f"/generate returned {len(out.get('output_ids') or [])} tokens but {len(pairs)} log-probs "
                          f"(send return_logprob: true)")
    finish = (meta.get("finish_reason") or {}).get("type") or "abort"
    sample.append_response_tokens(tokens=[int(p[1]) for p in pairs], log_probs=[float(p[0]) for p in pairs],
                                  version=token_versions(meta, len(pairs)), finish_reason=finish,
                                  text=out.get("text") or None)
    if t0 is not None:
        sample.metadata["generation_time"] = sample.metadata.get("generation_time", 0.0) + time.time() - t0
    return len(pairs)


async def generate_group(client: EngineClient, todo: Group, params: list[dict[str, Any]]) -> int:
    """Generate every sample of `todo` with its own params; one batched request per distinct params."""
    by_params: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        by_params.setdefault(repr(sorted(p.items())), []).append(i)
    tokens = 0

    async def one(idx: list[int]) -> None:
        nonlocal tokens
        t0 = time.time()
        outs = await client.generate({"input_ids": [todo[i].tokens for i in idx], "return_logprob": True,
                                      "sampling_params": params[idx[0]]})
        if not isinstance(outs, list) or len(outs) != len(idx):
            raise EngineError(f"batched /generate of {len(idx)} prompts returned {type(outs).__name__}")
        for i, out in zip(idx, outs, strict=True):
            tokens += apply_output(todo[i], out, t0)

    await asyncio.gather(*(one(idx) for idx in by_params.values()))
    return tokens


def _payload(sample: Sample, sampling_params: dict[str, Any]) -> dict[str, Any]:
    if sample.status not in (Status.PENDING, Status.ABORTED):
        raise ValueError(f"sample {sample.index}: generate() on a {sample.status.value} sample")
    return {"input_ids": list(sample.tokens), "sampling_params": sampling_params, "return_logprob": True}


async def generate(args: argparse.Namespace, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """slime's default generate: resume from `sample.tokens` (prompt + partial response), append the new tokens."""
    t0 = time.time()
    apply_output(sample, await post_generate(args, _payload(sample, sampling_params)), t0)
    return sample


async def generate_streaming(args: argparse.Namespace, sample: Sample, sampling_params: dict[str, Any],
                             client: EngineClient | None = None) -> Sample:
    """`generate` with `"stream": true`: the last cumulative event seen is what the sample keeps.

    If the stream ends without a finish reason (abort, engine gone, connection broken) the sample keeps the prefix
    of the last event and becomes ABORTED, so a partial rollout resumes from a coherent point; when its engine died
    before the first event the sample is ABORTED with nothing added, so it is sent again rather than failed.
    """
    client = client or client_for(args)
    t0, last = time.time(), None
    try:
        async for event in client.generate_stream(_payload(sample, sampling_params)):
            last = event
    except EngineLost:  # its engine died: keep what came and resume elsewhere; nothing came: just go again
        if last is None:
            sample.status = Status.ABORTED
            return sample
    except EngineError:
        if last is None:
            raise
    if last is None:
        raise EngineError("stream ended before the first event")
    if not (last["meta_info"].get("finish_reason") or {}).get("type"):
        last = {**last, "meta_info": {**last["meta_info"], "finish_reason": {"type": "abort"}}}
    apply_output(sample, last, t0)
    return sample
