"""msgspec structs for the bodies of SGLang's native HTTP API, as served by the embedded engine.

Field names follow SGLang (`managers/io_struct.py`) so the same client code talks to either server. Unknown fields are
ignored (SGLang's router re-serialises bodies anyway). Type errors surface as `msgspec.ValidationError`, which the
server turns into HTTP 400; semantic checks live in `SamplingParams.check` / `GenerateRequest.check`.
"""

from __future__ import annotations

from typing import Any

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True):
    """Per-request sampling knobs (SGLang names and defaults)."""

    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off; 0 is refused, as in SGLang
    min_p: float = 0.0
    stop: str | list[str] | None = None  # needs a tokenizer
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # also disables stop_token_ids, as in SGLang
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    custom_params: dict[str, Any] | None = None

    def check(self, vocab_size: int) -> None:
        """Raise ValueError for values SGLang rejects or this engine does not implement."""
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:  # `not >=` also catches NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:  # SGLang's SamplingParams.verify
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        for tok in self.stop_token_ids or ():
            if not 0 <= tok < vocab_size:
                raise ValueError(f"stop_token_ids: {tok} outside vocabulary of size {vocab_size}")
        # Penalties and min_p change the sampling distribution (and so the logprobs RL trains on): refuse rather
        # than silently ignore. Defaults pass, so the router's explicit defaults are fine.
        unsupported = {
            "min_p": self.min_p != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "presence_penalty": self.presence_penalty != 0.0,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "min_new_tokens": self.min_new_tokens != 0,
            "n": self.n != 1,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"not supported by the embedded engine: {', '.join(bad)}")

    @property
    def stop_strings(self) -> list[str]:
        if not self.stop:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class GenerateRequest(msgspec.Struct, kw_only=True):
    """POST /generate. `input_ids` is a list of ints, or a list of lists for a batch (checked in `check`)."""

    input_ids: list[Any] | None = None
    text: str | list[str] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    rid: str | list[str] | None = None
    stream: bool = False

    def prompts(self, tokenize: Any, vocab_size: int) -> tuple[list[list[int]], bool]:
        """Normalise to (list of prompts as token ids, is_batch). `tokenize` maps str -> list[int] or is None."""
        if self.input_ids is not None and self.text is not None:
            raise ValueError("give either input_ids or text, not both")
        if self.input_ids is not None:
            ids = self.input_ids
            batch = bool(ids) and all(isinstance(x, list) for x in ids)
            prompts = ids if batch else [ids]
        elif self.text is not None:
            if tokenize is None:
                raise ValueError("text input needs a tokenizer; this engine has none, send input_ids")
            batch = isinstance(self.text, list)
            prompts = [tokenize(t) for t in (self.text if batch else [self.text])]
        else:
            raise ValueError("request has neither input_ids nor text")
        if not prompts:
            raise ValueError("empty batch")
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            for tok in p:
                # bool is a subclass of int: reject it explicitly.
                if not isinstance(tok, int) or isinstance(tok, bool):
                    raise ValueError(f"input_ids must be integers, got {tok!r}")
                if not 0 <= tok < vocab_size:
                    raise ValueError(f"token id {tok} outside vocabulary of size {vocab_size}")
        n = len(prompts)
        if isinstance(self.rid, list) and (not batch or len(self.rid) != n):
            raise ValueError(f"rid list of length {len(self.rid)} for {n} prompt(s) (batch={batch})")
        if isinstance(self.rid, str) and batch:
            raise ValueError("a batched request needs a list of rids")
        if isinstance(self.sampling_params, list) and len(self.sampling_params) != n:
            raise ValueError(f"{len(self.sampling_params)} sampling_params for {n} prompt(s)")
        return prompts, batch

    def params_for(self, i: int) -> SamplingParams:
        sp = self.sampling_params
        if isinstance(sp, list):
            return sp[i]
        return sp if sp is not None else SamplingParams()


def check_context(prompt_tokens: int, max_new_tokens: int | None, context_len: int) -> None:
    """SGLang's `TokenizerManager._validate_one_request`: a prompt that reaches the context length, or whose
    prompt + max_new_tokens exceeds it, is refused (400) rather than generated and cut at the context."""
    if prompt_tokens >= context_len:
        raise ValueError(f"The input ({prompt_tokens} tokens) is longer than the model's context length "
                         f"({context_len} tokens).")
    if max_new_tokens is not None and prompt_tokens + max_new_tokens > context_len:
        raise ValueError(
            f"Requested token count exceeds the model's maximum context length of {context_len} tokens. You "
            f"requested a total of {prompt_tokens + max_new_tokens} tokens: {prompt_tokens} tokens from the input "
            f"messages and {max_new_tokens} tokens for the completion. Please reduce the number of tokens in the "
            f"input messages or the completion to fit within the limit.")


class AbortRequest(msgspec.Struct, kw_only=True):
    """POST /abort_request."""

    rid: str | list[str] | None = None
    abort_all: bool = False


class PauseRequest(msgspec.Struct, kw_only=True):
    """POST /pause_generation. SGLang's default mode is "abort"; "retract" behaves like "in_place" here."""

    mode: str = "abort"


class UpdateWeightsFromDiskRequest(msgspec.Struct, kw_only=True):
    """POST /update_weights_from_disk."""

    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class MetaInfo(msgspec.Struct, kw_only=True):
    """`meta_info` of a /generate response. `output_token_logprobs` (UNSET) is omitted unless requested."""

    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    finish_reason: dict[str, Any] | None = None
    weight_version: str = ""
    output_token_logprobs: list[tuple[float, int, str | None]] | msgspec.UnsetType = msgspec.UNSET
    # streamrl extension, only when a weight update landed mid-request (in-place pause): [output index, version]
    # where each version's tokens start, so every token is attributed to the weights that produced it
    weight_version_starts: list[tuple[int, str]] | msgspec.UnsetType = msgspec.UNSET


class GenerateResponse(msgspec.Struct, kw_only=True):
    """One /generate result (a batch returns a list of these)."""

    text: str
    output_ids: list[int]
    meta_info: MetaInfo


class ErrorBody(msgspec.Struct):
    """`{"error": {"message": ...}}` for every 4xx."""

    error: dict[str, Any]

    @classmethod
    def of(cls, message: str, code: int = 400) -> ErrorBody:
        return cls(error={"message": message, "code": code})
