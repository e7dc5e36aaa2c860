"""Named-tensor wire format for weight updates: msgpack of (name, dtype, shape, raw bytes), never pickle.

Why not pickle / torch.save: the engine listens on a socket, and unpickling untrusted bytes executes code. This format
only ever yields plain tensors.

    blob = serialize_named_tensors([("model.norm.weight", t), ...])
    body = encode_update_request(named, weight_version="3")   # body for POST /update_weights_from_tensor
    pairs = deserialize_named_tensors(blob)                     # -> list[(name, torch.Tensor)]
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import torch

# Wire dtype names have no "torch." prefix (the same spelling slime sends to /update_weights_from_distributed).
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class TensorEntry(msgspec.Struct, array_like=True):
    """One tensor on the wire. array_like keeps the per-tensor overhead to a few bytes."""

    name: str
    dtype: str
    shape: list[int]
    data: bytes


class UpdateWeightsFromTensorRequest(msgspec.Struct, kw_only=True):
    """Body of POST /update_weights_from_tensor (msgpack; JSON also works, with `named_tensors` base64)."""

    named_tensors: bytes | list[TensorEntry]
    weight_version: str | None = None
    flush_cache: bool = True
    load_format: str | None = None


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype ("float32", "bfloat16", ...)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a wire name ("bfloat16"; "torch.bfloat16" too, as str(dtype) spells it)."""
    try:
        return _DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; supported: {sorted(_DTYPES)}") from None


def tensor_to_entry(name: str, tensor: torch.Tensor) -> TensorEntry:
    """Copy one tensor to CPU and wrap its raw bytes."""
    t = tensor.detach().to("cpu").contiguous()
    # view(uint8) reinterprets the storage, which also works for bfloat16 (numpy has no bfloat16).
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return TensorEntry(name=name, dtype=dtype_name(t.dtype), shape=list(t.shape), data=raw)


def entry_to_tensor(entry: TensorEntry) -> torch.Tensor:
    """Rebuild a CPU tensor from a TensorEntry, checking dtype, shape and byte count."""
    if entry.dtype not in _DTYPES:
        raise ValueError(f"{entry.name}: unsupported dtype {entry.dtype!r}")
    if any(d < 0 for d in entry.shape):
        raise ValueError(f"{entry.name}: negative dimension in shape {entry.shape}")
    dtype = _DTYPES[entry.dtype]
    numel = 1
    for d in entry.shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(entry.data) != numel * itemsize:
        raise ValueError(f"{entry.name}: {len(entry.data)} bytes for shape {entry.shape} of {entry.dtype}")
    if numel == 0:
        return torch.empty(entry.shape, dtype=dtype)
    # bytearray: torch.frombuffer wants writable memory; the copy also detaches us from the message buffer.
    return torch.frombuffer(bytearray(entry.data), dtype=dtype).reshape(entry.shape)


def serialize_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """Client side: encode (name, tensor) pairs as msgpack bytes."""
    return msgspec.msgpack.encode([tensor_to_entry(n, t) for n, t in named_tensors])


def deserialize_named_tensors(blob: bytes | list[TensorEntry]) -> list[tuple[str, torch.Tensor]]:
    """Server side: decode what `serialize_named_tensors` produced. Raises ValueError on malformed input."""
    try:
        entries = msgspec.msgpack.decode(blob, type=list[TensorEntry]) if isinstance(blob, bytes) else blob
    except msgspec.DecodeError as e:
        raise ValueError(f"bad named_tensors: {e}") from None
    return [(e.name, entry_to_tensor(e)) for e in entries]


def encode_update_request(
    named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None, flush_cache: bool = True
) -> bytes:
    """Client side: the whole msgpack body for POST /update_weights_from_tensor."""
    req = UpdateWeightsFromTensorRequest(
        named_tensors=serialize_named_tensors(named_tensors), weight_version=weight_version, flush_cache=flush_cache
    )
    return msgspec.msgpack.encode(req)
