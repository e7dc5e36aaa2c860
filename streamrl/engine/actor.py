"""Engine processes: `EmbeddedEngine` (in-process: model + scheduler + HTTP server) and `EngineActor`, its Ray face.

    with EmbeddedEngine(model_path, torch_threads=1) as eng:    # tests, single-process runs
        httpx.post(eng.url + "/generate", json={...})

    Actor = make_engine_actor(num_cpus=1)                        # or ray.remote(num_cpus=1)(EngineActor)
    a = Actor.remote(model_path); url = ray.get(a.url.remote())

Clients talk to both over HTTP exactly as they would to SGLang; the actor methods exist for lifecycle and for tests
that compare engine weights with a trainer's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamrl.net import free_port

from .kv import DEFAULT_MAX_PREFILL_TOKENS
from .scheduler import Scheduler
from .server import HttpServer, build_app
from .static_kv import LEN_BUCKETS, round_up_to_bucket

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(model_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load an HF causal LM in eval mode (float32 unless asked). Raises OSError/ValueError for a bad path."""

    if not os.path.isdir(model_path):
        raise OSError(f"not a model directory: {model_path!r}")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(model_path: str) -> Any:
    """AutoTokenizer if the directory ships one, else None (the engine then works on token ids only)."""
    if not any(os.path.exists(os.path.join(model_path, f)) for f in _TOKENIZER_FILES):
        return None

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # a broken tokenizer must not stop a token-in/token-out engine
        logger.warning("could not load tokenizer from %s; text fields will be empty", model_path, exc_info=True)
        return None


def eos_token_ids(model: torch.nn.Module) -> set[int]:
    """Default stop tokens: eos_token_id(s) of the model config and its generation config."""
    ids: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return ids


class EmbeddedEngine:
    """Model + continuous-batching scheduler + SGLang-compatible HTTP server, all in this process."""

    def __init__(
        self,
        model_path: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        weight_version: str = "0",
        torch_threads: int | None = 1,
        device: str = "cpu",
        max_running_requests: int = 256,
        kv_cache: bool = True,
        dtype: str = "float32",
        kv_backend: str = "auto",
        max_context_len: int = 1024,
        mem_fraction_static: float | None = None,
        max_prefill_tokens: int | None = DEFAULT_MAX_PREFILL_TOKENS,
        keep_kv_on_update: bool = False,
        num_continuous_decode_steps: int = 1,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)  # process-wide; engines share CPUs with trainers
        self.model_path, self.device = model_path, device
        self.dtype = getattr(torch, dtype)
        model = load_model(model_path, device, self.dtype)
        cfg = model.config.get_text_config()
        if mem_fraction_static is not None and str(device).startswith("cuda"):
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
            max_running_requests = kv_slots_for_budget(
                total, mem_fraction_static, model_bytes(model), kv_bytes_per_slot(cfg, max_context_len, self.dtype),
                max_running_requests)
        self.scheduler = Scheduler(
            model,
            vocab_size=cfg.vocab_size,
            max_positions=getattr(cfg, "max_position_embeddings", None) or 2**31 - 1,
            eos_token_ids=eos_token_ids(model),
            weight_version=weight_version,
            max_running_requests=max_running_requests,
            tokenizer=load_tokenizer(model_path),
            model_path=model_path,
            kv_cache=kv_cache,
            kv_backend=kv_backend,
            max_context_len=max_context_len,
            max_prefill_tokens=max_prefill_tokens,
            keep_kv_on_update=keep_kv_on_update,
            num_continuous_decode_steps=num_continuous_decode_steps,
        )
        app = build_app(self.scheduler, loader=lambda path: load_model(path, "cpu", self.dtype))
        self.http = HttpServer(app, host=host, port=port)
        self._started = False

    def start(self) -> EmbeddedEngine:
        """Start the scheduler thread and the HTTP server; returns once the server accepts connections."""
        if not self._started:
            self.scheduler.start()
            self.http.start()
            self._started = True
        return self

    def stop(self) -> None:
        """Abort in-flight requests (they return their prefixes), then stop the server."""
        if self._started:
            self.scheduler.stop()
            self.http.stop()
            self._started = False

    @property
    def url(self) -> str:
        return self.http.url

    def __enter__(self) -> EmbeddedEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get_weight_version(self) -> str:
        return self.scheduler.weight_version

    def get_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU clones of the model's state dict, read between forwards."""
        self.scheduler.check_weights_resident()
        return self.scheduler.run_exclusive(lambda m: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()})

    def state_dict_checksum(self) -> dict[str, float]:
        """name -> sum of the tensor in float64: a cheap fingerprint to compare with a trainer's weights."""
        self.scheduler.check_weights_resident()
        return self.scheduler.run_exclusive(
            lambda m: {k: float(v.detach().double().sum()) for k, v in m.state_dict().items()}
        )


class EngineActor:
    """Ray actor body: starts an EmbeddedEngine in `__init__` (same keyword arguments). Decorate at the use site or
    use make_engine_actor."""

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        self.engine = EmbeddedEngine(model_path, **kwargs).start()

    def url(self) -> str:
        return self.engine.url

    def pid(self) -> int:
        """The engine's process (fault tests kill or freeze it by pid)."""
        return os.getpid()

    def get_weight_version(self) -> str:
        return self.engine.get_weight_version()

    def state_dict_checksum(self) -> dict[str, float]:
        return self.engine.state_dict_checksum()

    def get_state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.get_state_dict()

    def shutdown(self) -> None:
        self.engine.stop()


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_slot(cfg: Any, max_context_len: int, dtype: torch.dtype) -> int:
    """K and V of one request slot as the slot cache allocates it: `max_context_len`, capped by the model's
    positions, rounded up to the cache's length bucket."""

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    positions = getattr(cfg, "max_position_embeddings", None) or LEN_BUCKETS[-1]
    length = round_up_to_bucket(min(max_context_len, positions, LEN_BUCKETS[-1]), LEN_BUCKETS)
    return 2 * cfg.num_hidden_layers * length * cfg.num_key_value_heads * head_dim * dtype.itemsize


def kv_slots_for_budget(total_bytes: int, mem_fraction_static: float, weight_bytes: int, slot_bytes: int,
                        max_running_requests: int) -> int:
    """`--sglang-mem-fraction-static` for the embedded engine: as in SGLang, weights + KV cache get this fraction
    of the GPU's memory; the KV slots that fit cap the running requests (more wait in the queue)."""
    if not 0 < mem_fraction_static <= 1:
        raise ValueError(f"--sglang-mem-fraction-static must be in (0, 1], got {mem_fraction_static}")
    budget = int(total_bytes * mem_fraction_static) - weight_bytes
    slots = budget // slot_bytes if budget > 0 else 0
    if slots < 1:
        raise ValueError(
            f"--sglang-mem-fraction-static {mem_fraction_static}: {total_bytes * mem_fraction_static / 2**30:.2f} GiB "
            f"holds the weights ({weight_bytes / 2**30:.2f} GiB) but not one KV slot ({slot_bytes / 2**20:.1f} MiB "
            f"at --engine-max-context-len); raise the fraction or lower the context length")
    if slots < max_running_requests:
        print(f"[streamrl] engine KV cache: {slots} slots fit --sglang-mem-fraction-static {mem_fraction_static} "
              f"(asked for {max_running_requests} running requests; the rest wait)", flush=True)
    return min(max_running_requests, slots)


def make_engine_actor(num_cpus: float = 1, **options: Any) -> Any:
    """`ray.remote(num_cpus=..., **options)(EngineActor)`; import ray lazily."""

    return ray.remote(num_cpus=num_cpus, **options)(EngineActor)


def spawn_engine_process(model_path: str, timeout: float = 300.0, **kwargs: Any) -> tuple[Any, str]:
    """An EmbeddedEngine in a separate OS process (as a trainer on the same GPU sees it), started with `kwargs`
    (plain values); returns (Popen, url) once /health answers. The caller kills the process."""

    port = free_port()
    code = ("import json, sys, time; from streamrl.engine.actor import EmbeddedEngine; "
            "EmbeddedEngine(sys.argv[1], **json.loads(sys.argv[2])).start(); time.sleep(1e9)")
    proc = subprocess.Popen([sys.executable, "-c", code, model_path, json.dumps({**kwargs, "port": port})],
                            env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine process for {model_path} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"engine process for {model_path} did not answer {url}/health within {timeout:.0f} s")
